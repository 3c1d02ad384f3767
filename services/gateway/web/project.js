// One project: its address, deployments with rollback and cancel, metrics, live logs, deploy
// form, settings, secrets (revealed to admins after a confirmation), custom domains and (for
// admins) deletion.

import { useEffect, useRef, useState } from "./vendor/hooks.mjs";
import { api, listAll, roleIn } from "./api.js";
import { Domains } from "./domains.js";
import { LiveLogs } from "./logs.js";
import { MetricsPanel } from "./metrics.js";
import { ProjectSettings } from "./settings.js";
import { shipSource, tarGzOfFolder } from "./ship.js";
import {
  ADMIN_ROLES,
  WRITE_ROLES,
  ActionButton,
  ActionForm,
  Field,
  SafeLink,
  Status,
  html,
  reasonText,
  resourcesText,
  usePolling,
  when,
} from "./ui.js";

const REFRESH_SECONDS = 3;

function what(deployment) {
  if (deployment.image) return `image ${deployment.image}`;
  if (deployment.command) return deployment.command;
  if (deployment.sourceSha256) return `source ${deployment.sourceSha256.slice(0, 12)}`;
  return "project default";
}

function DeployForm({ projectId, onDeployed }) {
  const [mode, setMode] = useState("command");
  return html`<${ActionForm}
    name="deploy"
    title="Deploy"
    submit="Deploy"
    action=${async (data, form) => {
      const replicas = Number(data.get("replicas") || 1);
      if (mode === "source") {
        const folder = form.querySelector('input[name="folder"]').files;
        const archive = form.querySelector('input[name="archive"]').files[0];
        if (!folder.length && !archive) throw new Error("pick a folder or a .tar.gz archive");
        const blob = archive || (await tarGzOfFolder(folder));
        await shipSource(projectId, blob, data.get("processType") || "", replicas);
        form.reset();
        onDeployed();
        return;
      }
      const body =
        mode === "image"
          ? { image: data.get("image"), imageCommand: data.get("imageCommand") || "" }
          : { command: data.get("command") };
      if (replicas > 1) body.replicas = replicas;
      await api("POST", `/v1/projects/${encodeURIComponent(projectId)}/deployments`, body);
      onDeployed();
    }}
  >
    <fieldset class="choice">
      <legend>Run</legend>
      <label><input type="radio" name="mode" value="command" checked=${mode === "command"}
        onChange=${() => setMode("command")} /> a command</label>
      <label><input type="radio" name="mode" value="image" checked=${mode === "image"}
        onChange=${() => setMode("image")} /> a container image</label>
      <label><input type="radio" name="mode" value="source" checked=${mode === "source"}
        onChange=${() => setMode("source")} /> source code</label>
    </fieldset>
    ${mode === "command"
      ? html`<${Field} label="Command" name="command" required
          placeholder='exec python3 -m http.server "$PORT"'
          hint="A Procfile-style shell line; it listens on $PORT." />`
      : mode === "image"
        ? html`<${Field} label="Image" name="image" required placeholder="docker.io/library/busybox:1.36" />
            <${Field} label="Image command (optional)" name="imageCommand" />`
        : html`<div class="pair">
              <${Field} label="A folder" name="folder" type="file" webkitdirectory multiple
                hint="Its files are packed in the browser (no file modes, links or empty folders; .git left out)." />
              <${Field} label="or a .tar.gz" name="archive" type="file" accept=".tar.gz,.tgz,application/gzip"
                hint="Made with tar -czf app.tar.gz -C my-app ." />
            </div>
            <${Field} label="Process type (optional)" name="processType" placeholder="web"
              hint="Built like a buildpack: requirements.txt, package.json or a Procfile." />`}
    <${Field} label="Replicas" name="replicas" type="number" min="1" max="20" value="1"
      hint="Each gets an equal share of the project's RAM and CPU, on its own server when one has room." />
  <//>`;
}

// The API cancels a deployment until it runs (and one crash-looping); building is offered
// too, the API answering with a sentence if it refuses.
const CANCELLABLE = new Set([
  "DEPLOYMENT_STATUS_QUEUED",
  "DEPLOYMENT_STATUS_SCHEDULING",
  "DEPLOYMENT_STATUS_BUILDING",
  "DEPLOYMENT_STATUS_STARTING",
  "DEPLOYMENT_STATUS_CRASH_LOOP",
]);

function Deployments({ deployments, error, canWrite, onChanged }) {
  if (error) return html`<p class="error" role="alert">${error}</p>`;
  if (deployments === undefined) return html`<p class="loading">Loading deployments…</p>`;
  if (deployments.length === 0) return html`<p class="notice" id="no-deployments">Not deployed yet.</p>`;
  return html`<table class="table" id="deployments">
    <caption class="sr-only">Deployments, newest first</caption>
    <thead><tr><th scope="col">Status</th><th scope="col">Release</th><th scope="col">Runs</th>
      <th scope="col">Created</th><th scope="col"><span class="sr-only">Actions</span></th></tr></thead>
    <tbody>
      ${deployments.map(
        (d) => html`<tr key=${d.id} data-deployment-id=${d.id}>
          <td><${Status} status=${d.status} />
            ${d.statusReason ? html`<div class="muted small wrap">${d.statusReason}</div>` : null}</td>
          <td class="release-reason">${reasonText(d.releaseReason)}</td>
          <td class="wrap mono">${what(d)}${d.replicas > 1
            ? html`<div class="muted small replica">replica ${(d.replicaIndex || 0) + 1} of ${d.replicas}</div>`
            : null}</td>
          <td>${when(d.createTime || d.createdAt)}</td>
          <td>${canWrite && CANCELLABLE.has(d.status)
            ? html`<${ActionButton}
                label="Cancel"
                busyLabel="Cancelling…"
                className="cancel-deployment danger"
                aria-label="Cancel this deployment"
                action=${async () => {
                  await api("POST", `/v1/deployments/${encodeURIComponent(d.id)}:cancel`, {});
                  onChanged();
                }}
              />`
            : null}${canWrite && d.status === "DEPLOYMENT_STATUS_RUNNING"
            ? html`<${ActionButton}
                label="Roll back"
                busyLabel="Rolling back…"
                className="rollback"
                aria-label="Roll back to the release before this one"
                action=${async () => {
                  await api("POST", `/v1/deployments/${encodeURIComponent(d.id)}:rollback`, {});
                  onChanged();
                }}
              />`
            : null}</td>
        </tr>`,
      )}
    </tbody>
  </table>`;
}

// An admin's reveal of one secret: a confirmation first, then RevealSecret (audited by the
// API); the value lives in this component's state only, so leaving the page (or another
// project) drops it, and Hide drops it at once.
function Reveal({ path, name }) {
  const [step, setStep] = useState("hidden"); // hidden | confirm | shown
  const [value, setValue] = useState("");
  const generation = useRef(0); // a reveal answered after a Hide or a navigation is dropped
  const hide = () => {
    generation.current++;
    setValue("");
    setStep("hidden");
  };
  useEffect(() => {
    window.addEventListener("hashchange", hide);
    return () => window.removeEventListener("hashchange", hide);
  }, []);
  if (step === "hidden") {
    return html`<button type="button" class="reveal-secret" aria-label=${`Reveal secret ${name}`}
      onClick=${() => setStep("confirm")}>Reveal</button>`;
  }
  if (step === "confirm") {
    return html`<span class="reveal-confirm" role="group" aria-label=${`Confirm revealing ${name}`}>
      <span class="small">Show the value of <code>${name}</code> on this screen? The reveal is recorded in the audit log.</span>
      <${ActionButton}
        label="Show value"
        busyLabel="Revealing…"
        className="confirm-reveal danger"
        action=${async () => {
          const asked = generation.current;
          const reply = await api("GET", `${path}/${encodeURIComponent(name)}:reveal`);
          if (asked !== generation.current) return;
          setValue(reply.value || "");
          setStep("shown");
        }}
      />
      <button type="button" class="cancel-reveal" onClick=${hide}>Cancel</button>
    </span>`;
  }
  return html`<span class="revealed">
    <code class="secret-value">${value}</code>
    <button type="button" class="hide-secret" onClick=${hide}>Hide</button>
  </span>`;
}

function Secrets({ projectId, canWrite, canAdmin }) {
  const path = `/v1/projects/${encodeURIComponent(projectId)}/secrets`;
  const [secrets, error, reload] = usePolling(() => listAll(path, "secrets"), 0, [projectId]);
  return html`<section aria-labelledby="secrets-title">
    <h2 id="secrets-title">Secrets</h2>
    <p class="muted small">Values are encrypted and stay off this page; admins may reveal one after confirming. Setting or deleting one restarts the running release with the new config.</p>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
    ${secrets && secrets.length === 0 ? html`<p class="notice" id="no-secrets">No secrets.</p>` : null}
    ${secrets && secrets.length
      ? html`<ul class="list" id="secrets">
          ${secrets.map(
            (s) => html`<li key=${s.name} class="row" data-secret=${s.name}>
              <span class="grow"><code class="secret-name">${s.name}</code>
                <span class="muted small"> version ${s.version} · ${when(s.updatedAt)}</span></span>
              ${canAdmin ? html`<${Reveal} key=${`${projectId}/${s.name}/${s.version}`} path=${path} name=${s.name} />` : null}
              ${canWrite
                ? html`<${ActionButton}
                    label="Delete"
                    className="danger"
                    aria-label=${`Delete secret ${s.name}`}
                    action=${async () => {
                      await api("DELETE", `${path}/${encodeURIComponent(s.name)}`);
                      reload();
                    }}
                  />`
                : null}
            </li>`,
          )}
        </ul>`
      : null}
    ${canWrite
      ? html`<${ActionForm}
          name="set-secret"
          title="Set a secret"
          submit="Set secret"
          after="reset"
          action=${async (data) => {
            const name = data.get("name");
            await api("PUT", `${path}/${encodeURIComponent(name)}`, { value: data.get("value") });
            reload();
          }}
        >
          <div class="pair">
            <${Field} label="Name" name="name" required pattern="[A-Z_][A-Z0-9_]*" maxlength="128"
              hint="Upper-case letters, digits and underscores." autocomplete="off" />
            <${Field} label="Value" name="value" type="password" autocomplete="off" />
          </div>
        <//>`
      : null}
  </section>`;
}

function DeleteProject({ project, onDeleted }) {
  const [typed, setTyped] = useState("");
  return html`<${ActionForm}
    name="delete-project"
    title="Delete this project"
    submit="Delete project"
    disabled=${typed !== project.slug}
    action=${async () => {
      await api("DELETE", `/v1/projects/${encodeURIComponent(project.id)}`);
      onDeleted();
    }}
  >
    <p class="small">Its app stops and its resources go back to the organization's pool. This cannot be undone.</p>
    <${Field}
      label=${`Type the project's slug (${project.slug}) to confirm`}
      name="confirm"
      autocomplete="off"
      value=${typed}
      onInput=${(e) => setTyped(e.currentTarget.value)}
    />
  <//>`;
}

export function ProjectPage({ projectId, userId, onDeleted }) {
  // The role in the project's own organization, whichever organization is current.
  const [loaded, projectError, reloadProject] = usePolling(
    async () => {
      const project = await api("GET", `/v1/projects/${encodeURIComponent(projectId)}`);
      return { project, role: await roleIn(project.organizationId, userId) };
    },
    0,
    [projectId, userId],
  );
  const project = loaded && loaded.project;
  const canWrite = Boolean(loaded && WRITE_ROLES.has(loaded.role));
  const canAdmin = Boolean(loaded && ADMIN_ROLES.has(loaded.role));
  const [deployments, deploymentsError, reloadDeployments] = usePolling(
    async () =>
      (await api("GET", `/v1/projects/${encodeURIComponent(projectId)}/deployments?pageSize=20`))
        .deployments || [],
    REFRESH_SECONDS,
    [projectId],
  );
  if (projectError) {
    return html`<main id="main"><p class="error" role="alert">${projectError}</p>
      <p><a href="#/projects">Back to projects</a></p></main>`;
  }
  if (!project) return html`<main id="main"><p class="loading">Loading the project…</p></main>`;
  return html`<main id="main" class="project">
    <p><a href="#/projects">← Projects</a></p>
    <h1 id="project-name">${project.name}</h1>
    ${project.description ? html`<p class="description">${project.description}</p>` : null}
    <dl class="facts">
      <dt>Address</dt>
      <dd id="project-url"><${SafeLink} href=${project.url}>${project.url || project.hostname}<//></dd>
      <dt>Resources</dt><dd>${resourcesText(project.resources)}</dd>
      <dt>Region</dt><dd>${project.region || "any"}</dd>
    </dl>
    <section aria-labelledby="deployments-title">
      <h2 id="deployments-title">Deployments</h2>
      <${Deployments}
        deployments=${deployments}
        error=${deploymentsError}
        canWrite=${canWrite}
        onChanged=${reloadDeployments}
      />
    </section>
    <${MetricsPanel} projectId=${projectId} />
    <${LiveLogs} projectId=${projectId} />
    ${canWrite ? html`<${DeployForm} projectId=${projectId} onDeployed=${reloadDeployments} />` : null}
    ${canWrite
      ? html`<${ProjectSettings} key=${project.id} project=${project}
          onSaved=${reloadProject} />`
      : null}
    <${Secrets} projectId=${projectId} canWrite=${canWrite} canAdmin=${canAdmin} />
    <${Domains} projectId=${projectId} canAdmin=${canAdmin} />
    ${canAdmin ? html`<${DeleteProject} project=${project} onDeleted=${onDeleted} />` : null}
  </main>`;
}
