// The current organization's settings (`#/organization`): its name and slug, renamed by
// admins and owners (`PATCH /v1/organizations/{id}`, the body naming the changed fields, so
// the gateway's implied update mask touches only those), and deleted by owners
// (`DELETE /v1/organizations/{id}`) from a modal dialog once the slug is typed. The API
// checks both roles again; its refusals are shown as sentences.

import { useEffect, useRef, useState } from "./vendor/hooks.mjs";
import { api, describe, listAll } from "./api.js";
import { ADMIN_ROLES, ActionForm, Field, html, roleText, usePolling, when } from "./ui.js";

const orgPath = (org) => `/v1/organizations/${encodeURIComponent(org.id)}`;
const FOCUSABLE = 'a[href], button:not([disabled]), input:not([disabled]), select:not([disabled]), [tabindex="0"]';

function RenameForm({ org, onRenamed }) {
  const [name, setName] = useState(org.name);
  const [slug, setSlug] = useState(org.slug);
  const [saved, setSaved] = useState(false);
  useEffect(() => {
    setName(org.name);
    setSlug(org.slug);
  }, [org.name, org.slug]);
  return html`<${ActionForm}
    name="rename-org"
    level=${2}
    title="Name and slug"
    submit="Save"
    action=${async () => {
      setSaved(false);
      const changed = {};
      if (name.trim() !== org.name) changed.name = name.trim();
      if (slug !== org.slug) changed.slug = slug;
      if (!Object.keys(changed).length) throw new Error("nothing changed");
      const updated = await api("PATCH", orgPath(org), changed);
      setSaved(true);
      await onRenamed(updated);
    }}
  >
    <${Field} label="Name" name="name" required maxlength="100" value=${name}
      onInput=${(e) => {
        setSaved(false);
        setName(e.currentTarget.value);
      }} />
    <${Field} label="Slug" name="slug" required pattern="[a-z0-9]+(-[a-z0-9]+)*" maxlength="40" value=${slug}
      hint="Part of every app's address (<project>-<slug>): a new slug changes them."
      onInput=${(e) => {
        setSaved(false);
        setSlug(e.currentTarget.value);
      }} />
    <p class="ok" id="org-saved" role="status">${saved ? "Saved." : ""}</p>
  <//>`;
}

// A modal dialog: Tab and Shift+Tab stay inside it, Escape or Cancel closes it, and focus
// goes back to the button that opened it.
function DeleteDialog({ org, projects, opener, onClose, onDeleted }) {
  const dialog = useRef(null);
  const [typed, setTyped] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    const element = dialog.current;
    if (!element.open) element.showModal();
    element.querySelector('input[name="confirm"]').focus();
    return () => {
      if (element.open) element.close();
      if (opener.current) opener.current.focus();
    };
  }, []);
  function onKeyDown(event) {
    if (event.key !== "Tab") return;
    const stops = [...dialog.current.querySelectorAll(FOCUSABLE)];
    if (!stops.length) return;
    const first = stops[0];
    const last = stops[stops.length - 1];
    if (event.shiftKey && document.activeElement === first) {
      event.preventDefault();
      last.focus();
    } else if (!event.shiftKey && document.activeElement === last) {
      event.preventDefault();
      first.focus();
    }
  }
  async function onSubmit(event) {
    event.preventDefault();
    setBusy(true);
    setError("");
    try {
      await api("DELETE", orgPath(org));
      await onDeleted();
    } catch (problem) {
      setError(describe(problem));
      setBusy(false);
    }
  }
  const count = projects === undefined ? null : projects.length;
  return html`<dialog class="card dialog" id="delete-org-dialog" ref=${dialog} aria-labelledby="delete-org-title"
    aria-describedby="delete-org-what" onKeyDown=${onKeyDown} onClose=${onClose}>
    <form name="delete-org" class="form" onSubmit=${onSubmit}>
      <h2 id="delete-org-title">Delete ${org.name}?</h2>
      <p id="delete-org-what">
        ${count === 0
          ? "It has no projects."
          : `${count === null ? "Its projects go" : `Its ${count} project${count === 1 ? " goes" : "s go"}`} with it: their
            apps stop, their secrets and domains are deleted.`}
        Its members, audit log and subscription go too (the plan is cancelled). This cannot be undone.
      </p>
      <${Field}
        label=${`Type the organization's slug (${org.slug}) to confirm`}
        name="confirm"
        autocomplete="off"
        value=${typed}
        onInput=${(e) => setTyped(e.currentTarget.value)}
      />
      <div class="actions">
        <button type="button" class="secondary" id="delete-org-cancel" onClick=${onClose}>Cancel</button>
        <button type="submit" class="destructive" id="delete-org-confirm" disabled=${busy || typed !== org.slug}>
          ${busy ? "Deleting…" : "Delete organization"}
        </button>
      </div>
      ${error ? html`<p class="error" role="alert" id="delete-org-error">${error}</p>` : null}
    </form>
  </dialog>`;
}

export function OrgSettingsPage({ org, role, onRenamed, onDeleted }) {
  const [projects] = usePolling(() => listAll(`${orgPath(org)}/projects`, "projects"), 0, [org.id]);
  const [deleting, setDeleting] = useState(false);
  const opener = useRef(null);
  const isOwner = role === "ROLE_OWNER";
  return html`<main id="main">
    <h1>Settings <span class="muted">of ${org.name}</span></h1>
    <p class="muted">Your role here: <span id="my-role">${roleText(role) || "…"}</span>.
      Admins and owners rename the organization; only owners delete it.</p>
    <dl class="facts" id="org-facts">
      <dt>Name</dt><dd id="org-name">${org.name}</dd>
      <dt>Slug</dt><dd id="org-slug" class="mono">${org.slug}</dd>
      <dt>Created</dt><dd>${when(org.createdAt)}</dd>
      <dt>Projects</dt><dd id="org-projects">${projects === undefined ? "…" : projects.length}</dd>
    </dl>
    ${ADMIN_ROLES.has(role) ? html`<${RenameForm} org=${org} onRenamed=${onRenamed} />` : null}
    ${isOwner
      ? html`<section class="card danger-zone" aria-labelledby="danger-title">
          <h2 id="danger-title">Delete this organization</h2>
          <p class="small">Everything in it goes: projects and their apps, secrets, domains, members and the plan.</p>
          <button type="button" class="destructive" id="delete-org" ref=${opener}
            aria-haspopup="dialog" onClick=${() => setDeleting(true)}>Delete organization…</button>
        </section>`
      : null}
    ${isOwner && deleting
      ? html`<${DeleteDialog}
          org=${org}
          projects=${projects}
          opener=${opener}
          onClose=${() => setDeleting(false)}
          onDeleted=${onDeleted}
        />`
      : null}
  </main>`;
}
