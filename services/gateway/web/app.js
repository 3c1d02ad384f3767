// The Hangar dashboard: a client of the public /v1 API, routed by the URL's hash (#/login,
// #/signup, #/oauth, #/orgs, #/projects, #/projects/<id>, #/members, #/billing, #/audit, #/organization,
// #/servers), so the gateway serves one page.

import { render } from "./vendor/preact.mjs";
import { useEffect, useState } from "./vendor/hooks.mjs";
import { describe, listAll, logout, onSessionChange, resume, roleIn } from "./api.js";
import { LoginPage, OrganizationsPage, ProjectsPage, SignUpPage } from "./pages.js";
import { OAuthCallbackPage, takeOAuthResponse } from "./oauth.js";
import { AuditPage, BillingPage, MembersPage, ServersPage } from "./org.js";
import { ProjectPage } from "./project.js";
import { OrgSettingsPage } from "./orgsettings.js";
import { ADMIN_ROLES, WRITE_ROLES, html } from "./ui.js";

const ORG_KEY = "hangar.organization"; // which organization is current: an id, not a secret

let lastShown = null; // the page last shown ("page/id"), to move focus only on a change

function currentRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  return { page: parts[0] || "", id: parts[1] ? decodeURIComponent(parts[1]) : "" };
}

function go(hash) {
  if (location.hash !== hash) location.hash = hash;
}

function useRoute() {
  const [route, setRoute] = useState(currentRoute());
  useEffect(() => {
    const update = () => setRoute(currentRoute());
    addEventListener("hashchange", update);
    return () => removeEventListener("hashchange", update);
  }, []);
  return route;
}

function Header({ user, orgs, org, role, onSwitch, onLogout }) {
  return html`<header class="top">
    <a class="skip" href="#main" onClick=${(e) => {
      e.preventDefault();
      document.getElementById("main")?.focus();
    }}>Skip to content</a>
    <a class="brand" href="#/projects">Hangar</a>
    <nav aria-label="Main">
      <a href="#/projects">Projects</a>
      ${org ? html`<a href="#/members" id="nav-members">Members</a>` : null}
      ${org ? html`<a href="#/billing" id="nav-billing">Billing</a>` : null}
      ${org && ADMIN_ROLES.has(role) ? html`<a href="#/audit" id="nav-audit">Audit log</a>` : null}
      ${org ? html`<a href="#/organization" id="nav-org-settings">Settings</a>` : null}
      <a href="#/orgs">Organizations</a>
      ${user.isPlatformAdmin ? html`<a href="#/servers" id="nav-servers">Servers</a>` : null}
    </nav>
    ${orgs.length
      ? html`<label class="switcher"><span class="label">Organization</span>
          <select name="organization" value=${org ? org.id : ""}
            onChange=${(e) => onSwitch(e.currentTarget.value)}>
            ${orgs.map((o) => html`<option key=${o.id} value=${o.id}>${o.name}</option>`)}
          </select></label>`
      : null}
    <span class="who muted" id="who">${user.email}</span>
    <button type="button" id="logout" onClick=${onLogout}>Log out</button>
  </header>`;
}

function App() {
  const route = useRoute();
  const [user, setUser] = useState(undefined); // undefined: not known yet; null: signed out
  const [orgs, setOrgs] = useState([]);
  const [orgId, setOrgId] = useState(localStorage.getItem(ORG_KEY) || "");
  const [role, setRole] = useState("");
  const [problem, setProblem] = useState("");

  useEffect(() => {
    const stop = onSessionChange((u) => setUser(u));
    resume()
      .then((u) => setUser(u))
      .catch(() => setUser(null));
    return stop;
  }, []);

  async function loadOrgs(preferred) {
    try {
      const list = await listAll("/v1/organizations", "organizations");
      setOrgs(list);
      const wanted = preferred || orgId;
      const chosen = list.find((o) => o.id === wanted) || list[0];
      switchTo(chosen ? chosen.id : "");
      setProblem("");
      return list;
    } catch (error) {
      setProblem(describe(error));
      return [];
    }
  }

  function switchTo(id) {
    setOrgId(id);
    if (id) localStorage.setItem(ORG_KEY, id);
  }

  useEffect(() => {
    if (user) loadOrgs();
    else {
      setOrgs([]);
      setRole("");
    }
  }, [user && user.id]);

  useEffect(() => {
    setRole("");
    if (!user || !orgId) return;
    let alive = true;
    roleIn(orgId, user.id)
      .then((r) => alive && setRole(r))
      .catch((error) => alive && setProblem(describe(error)));
    return () => {
      alive = false;
    };
  }, [orgId, user && user.id]);

  useEffect(() => {
    const signingIn = ["login", "signup", "oauth"].includes(route.page);
    if (user === null && !signingIn) go("#/login");
    if (user && (signingIn || route.page === "")) go("#/projects");
  }, [user, route.page]);

  useEffect(() => {
    // A new page: move focus to its content for keyboard and screen-reader users.
    document.getElementById("main")?.setAttribute("tabindex", "-1");
  });

  useEffect(() => {
    // Not on the first load (focus starts at the document), only on a move to another page.
    const shown = `${route.page}/${route.id}`;
    if (lastShown !== null && lastShown !== shown) document.getElementById("main")?.focus({ preventScroll: true });
    lastShown = shown;
  }, [route.page, route.id]);

  if (user === undefined) return html`<p class="loading">Loading…</p>`;
  if (user === null) {
    if (route.page === "oauth") return html`<${OAuthCallbackPage} onSignedIn=${setUser} />`;
    return route.page === "signup"
      ? html`<${SignUpPage} onSignedIn=${setUser} />`
      : html`<${LoginPage} onSignedIn=${setUser} />`;
  }
  const org = orgs.find((o) => o.id === orgId);
  const canWrite = WRITE_ROLES.has(role);
  let page;
  if (route.page === "servers") {
    page = html`<${ServersPage} />`;
  } else if (route.page === "orgs" || (!org && orgs.length === 0)) {
    page = html`<${OrganizationsPage}
      orgs=${orgs}
      currentId=${orgId}
      onSwitch=${(id) => {
        switchTo(id);
        go("#/projects");
      }}
      onCreated=${async (created) => {
        await loadOrgs(created.id);
        go("#/projects");
      }}
    />`;
  } else if (route.page === "projects" && route.id) {
    page = html`<${ProjectPage}
      key=${route.id}
      projectId=${route.id}
      userId=${user.id}
      onDeleted=${() => go("#/projects")}
    />`;
  } else if (org && route.page === "members") {
    page = html`<${MembersPage} key=${org.id} org=${org} userId=${user.id} />`;
  } else if (org && route.page === "billing") {
    page = html`<${BillingPage} key=${org.id} org=${org} role=${role} />`;
  } else if (org && route.page === "audit") {
    page = html`<${AuditPage} key=${org.id} org=${org} />`;
  } else if (org && route.page === "organization") {
    page = html`<${OrgSettingsPage}
      key=${org.id}
      org=${org}
      role=${role}
      onRenamed=${(renamed) => loadOrgs(renamed.id)}
      onDeleted=${async () => {
        localStorage.removeItem(ORG_KEY);
        await loadOrgs("");
        go("#/orgs");
      }}
    />`;
  } else if (org) {
    page = html`<${ProjectsPage} key=${org.id} org=${org} role=${role} canWrite=${canWrite} />`;
  } else {
    page = html`<main id="main"><p class="loading">Loading organizations…</p></main>`;
  }
  return html`<div class="shell">
    <${Header}
      user=${user}
      orgs=${orgs}
      org=${org}
      role=${role}
      onSwitch=${(id) => {
        switchTo(id);
        if (!["members", "billing", "audit", "organization"].includes(route.page)) go("#/projects");
      }}
      onLogout=${async () => {
        try {
          await logout();
        } finally {
          setUser(null);
          go("#/login");
        }
      }}
    />
    ${problem ? html`<p class="error banner" role="alert">${problem}</p>` : null}
    ${page}
  </div>`;
}

takeOAuthResponse(); // an OpenID Connect provider's answer in the URL: out of it before routing
render(html`<${App} />`, document.getElementById("app"));
