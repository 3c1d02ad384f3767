// Sign-up, log-in, organizations and the project list of the current organization.

import { useState } from "./vendor/hooks.mjs";
import { api, listAll, login, signUp } from "./api.js";
import { OAuthButtons } from "./oauth.js";
import { CPU_MIN, RAM_MIN, Slider } from "./settings.js";
import {
  ActionForm,
  Field,
  Status,
  count,
  html,
  resourcesText,
  roleText,
  slugify,
  usePolling,
} from "./ui.js";

export function LoginPage({ onSignedIn }) {
  return html`<main class="narrow" id="main">
    <h1>Log in to Hangar</h1>
    <${ActionForm}
      name="login"
      title=""
      submit="Log in"
      action=${async (data) => onSignedIn(await login(data.get("email"), data.get("password")))}
    >
      <${Field} label="Email" name="email" type="email" autocomplete="username" required />
      <${Field} label="Password" name="password" type="password" autocomplete="current-password" required />
    <//>
    <${OAuthButtons} />
    <p>No account yet? <a href="#/signup">Sign up</a>.</p>
  </main>`;
}

export function SignUpPage({ onSignedIn }) {
  return html`<main class="narrow" id="main">
    <h1>Create a Hangar account</h1>
    <${ActionForm}
      name="signup"
      title=""
      submit="Sign up"
      action=${async (data) =>
        onSignedIn(await signUp(data.get("email"), data.get("password"), data.get("name")))}
    >
      <${Field} label="Name" name="name" autocomplete="name" />
      <${Field} label="Email" name="email" type="email" autocomplete="username" required />
      <${Field}
        label="Password"
        name="password"
        type="password"
        autocomplete="new-password"
        minlength="10"
        hint="At least 10 characters, not a common password."
        required
      />
    <//>
    <p>Already have an account? <a href="#/login">Log in</a>.</p>
  </main>`;
}

export function OrganizationsPage({ orgs, currentId, onSwitch, onCreated }) {
  const [slugTouched, setSlugTouched] = useState(false);
  const [slug, setSlug] = useState("");
  return html`<main id="main">
    <h1>Organizations</h1>
    ${orgs.length === 0
      ? html`<p class="notice">You belong to no organization yet: create one to start.</p>`
      : html`<ul class="list" aria-label="Your organizations">
          ${orgs.map(
            (org) => html`<li key=${org.id} class="row" data-org-id=${org.id}>
              <span class="grow"><strong class="org-name">${org.name}</strong>
                <span class="muted"> ${org.slug}</span></span>
              ${org.id === currentId
                ? html`<span class="badge">current</span>`
                : html`<button type="button" onClick=${() => onSwitch(org.id)}
                    aria-label=${`Switch to ${org.name}`}>Switch</button>`}
            </li>`,
          )}
        </ul>`}
    <${ActionForm}
      name="create-org"
      level=${2}
      title="New organization"
      submit="Create organization"
      after="reset"
      action=${async (data) => {
        const org = await api("POST", "/v1/organizations", {
          name: data.get("name"),
          slug: data.get("slug") || slugify(data.get("name")),
        });
        setSlug("");
        setSlugTouched(false);
        onCreated(org);
      }}
    >
      <${Field}
        label="Name"
        name="name"
        required
        onInput=${(e) => !slugTouched && setSlug(slugify(e.currentTarget.value))}
      />
      <${Field}
        label="Slug"
        name="slug"
        value=${slug}
        pattern="[a-z0-9]+(-[a-z0-9]+)*"
        maxlength="40"
        hint="Lower-case letters, digits and dashes; part of your apps' addresses."
        onInput=${(e) => {
          setSlugTouched(true);
          setSlug(e.currentTarget.value);
        }}
      />
    <//>
  </main>`;
}

async function projectsWithLatest(orgId) {
  const projects = await listAll(`/v1/organizations/${encodeURIComponent(orgId)}/projects`, "projects");
  // The latest deployment of each, for its status at a glance (one small call per project).
  const latest = await Promise.all(
    projects.map((p) =>
      api("GET", `/v1/projects/${encodeURIComponent(p.id)}/deployments?pageSize=1`)
        .then((reply) => (reply.deployments || [])[0] || null)
        .catch(() => null),
    ),
  );
  return projects.map((project, i) => ({ project, latest: latest[i] }));
}

function planText(plan) {
  const used = plan.allocated || {};
  const pool = plan.pool || {};
  return (
    `Plan ${plan.planId}: ${used.ramMb || 0} of ${pool.ramMb || 0} MB RAM and ` +
    `${used.cpuMillis || 0} of ${pool.cpuMillis || 0} mCPU allocated.`
  );
}

async function subscriptionOf(orgId) {
  try {
    return await api("GET", `/v1/organizations/${encodeURIComponent(orgId)}/subscription`);
  } catch (problem) {
    if (problem.status === 404) return null; // the plan is still being set up
    throw problem;
  }
}

// RAM and CPU of a new project: sliders from the API's minimum to what the pool has left.
function PoolSliders({ plan }) {
  const pool = plan.pool || {};
  const used = plan.allocated || {};
  const ramFree = count(pool.ramMb) - count(used.ramMb);
  const cpuFree = count(pool.cpuMillis) - count(used.cpuMillis);
  const ramMax = Math.max(RAM_MIN, ramFree);
  const cpuMax = Math.max(CPU_MIN, cpuFree);
  const [ram, setRam] = useState(Math.min(256, ramMax));
  const [cpu, setCpu] = useState(Math.min(250, cpuMax));
  return html`<div class="pair">
      <${Slider} label="RAM" name="ramMb" min=${RAM_MIN} max=${ramMax} unit="MB" value=${Math.min(ram, ramMax)}
        onInput=${setRam} errors=${{}} hint="what the pool has left" />
      <${Slider} label="CPU" name="cpuMillis" min=${CPU_MIN} max=${cpuMax} unit="mCPU" value=${Math.min(cpu, cpuMax)}
        onInput=${setCpu} errors=${{}} hint="what the pool has left" />
    </div>
    ${ramFree < RAM_MIN || cpuFree < CPU_MIN
      ? html`<p class="notice" id="pool-full">The pool has too little left for a new project: free some, or change the plan.</p>`
      : null}`;
}

export function ProjectsPage({ org, role, canWrite }) {
  const [rows, error, reload] = usePolling(() => projectsWithLatest(org.id), 5, [org.id]);
  const [plan, planError] = usePolling(() => subscriptionOf(org.id), 3, [org.id]);
  const [slug, setSlug] = useState("");
  const [slugTouched, setSlugTouched] = useState(false);
  const [created, setCreated] = useState(0); // new sliders after a create (the form resets)
  return html`<main id="main">
    <h1>Projects <span class="muted">in ${org.name}</span></h1>
    <p class="muted">Your role here: <span id="my-role">${roleText(role) || "…"}</span></p>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
    ${rows === undefined
      ? html`<p class="loading">Loading projects…</p>`
      : rows.length === 0
        ? html`<p class="notice" id="no-projects">No projects yet.</p>`
        : html`<table class="table" id="projects">
            <caption class="sr-only">Projects of ${org.name}</caption>
            <thead><tr><th scope="col">Project</th><th scope="col">Latest deployment</th>
              <th scope="col">Resources</th><th scope="col">Address</th></tr></thead>
            <tbody>
              ${rows.map(
                ({ project, latest }) => html`<tr key=${project.id} data-project-id=${project.id}>
                  <td><a class="project-name" href=${`#/projects/${encodeURIComponent(project.id)}`}
                    >${project.name}</a><div class="muted">${project.slug}</div></td>
                  <td>${latest ? html`<${Status} status=${latest.status} />` : html`<span class="muted">never deployed</span>`}</td>
                  <td>${resourcesText(project.resources)}</td>
                  <td class="wrap">${project.hostname}</td>
                </tr>`,
              )}
            </tbody>
          </table>`}
    ${plan
      ? html`<p class="muted" id="plan">${planText(plan)}</p>`
      : null}
    ${planError ? html`<p class="error" role="alert">${planError}</p>` : null}
    ${canWrite
      ? plan === null || plan === undefined
        ? html`<p class="notice" id="plan-pending">Setting up this organization's plan…</p>`
        : html`<${ActionForm}
            name="create-project"
            level=${2}
            title="New project"
            submit="Create project"
            after="reset"
            action=${async (data) => {
              await api("POST", `/v1/organizations/${encodeURIComponent(org.id)}/projects`, {
                name: data.get("name"),
                slug: data.get("slug") || slugify(data.get("name")),
                description: data.get("description") || "",
                resources: { ramMb: Number(data.get("ramMb")), cpuMillis: Number(data.get("cpuMillis")) },
              });
              setSlug("");
              setSlugTouched(false);
              setCreated((n) => n + 1);
              reload();
            }}
          >
            <${Field}
              label="Name"
              name="name"
              required
              onInput=${(e) => !slugTouched && setSlug(slugify(e.currentTarget.value))}
            />
            <${Field}
              label="Slug"
              name="slug"
              value=${slug}
              pattern="[a-z0-9]+(-[a-z0-9]+)*"
              maxlength="40"
              onInput=${(e) => {
                setSlugTouched(true);
                setSlug(e.currentTarget.value);
              }}
            />
            <${Field} label="Description" name="description" />
            <${PoolSliders} key=${created} plan=${plan} />
          <//>`
      : null}
  </main>`;
}
