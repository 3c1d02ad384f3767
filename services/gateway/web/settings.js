// A project's settings: name, description, health check path, sleep, restart policy, and its
// RAM and CPU as sliders bounded by what the organization's pool has left plus what the
// project already holds. Saved with `PATCH /v1/projects/{id}` whose body names only the
// changed fields: the gateway takes the update mask from the fields a PATCH body sets
// (AIP-134), as `hangar scale` does. The API's field violations are shown next to their field.

import { useEffect, useState } from "./vendor/hooks.mjs";
import { ApiError, api, describe } from "./api.js";
import { count, html } from "./ui.js";

// The API's bounds (services/project/domain.py); the pool narrows the upper ones.
export const RAM_MIN = 32;
export const CPU_MIN = 10;
const SLEEP_MIN = 30;
const SLEEP_MAX = 7 * 86400;

const RESTART = [
  ["RESTART_POLICY_ON_FAILURE", "On failure (non-zero exit, kill, failed liveness check)"],
  ["RESTART_POLICY_ALWAYS", "Always (any end, exit 0 included)"],
  ["RESTART_POLICY_NEVER", "Never (the deployment fails with its app)"],
];

// "project.health_check_path" -> "healthCheckPath": the form's own name for the field.
export function fieldOf(violation) {
  return String(violation || "")
    .replace(/^project\./, "")
    .replace(/^resources\./, "")
    .replace(/_([a-z])/g, (_, c) => c.toUpperCase());
}

// An API error split into per-field sentences and the rest.
export function splitErrors(problem, fields) {
  const byField = {};
  const rest = [];
  if (problem instanceof ApiError) {
    for (const detail of problem.body.details || []) {
      for (const v of detail.fieldViolations || []) {
        const name = fieldOf(v.field);
        const text = String(v.description || "").trim();
        const sentence = text ? text[0].toUpperCase() + text.slice(1) + (/[.!?]$/.test(text) ? "" : ".") : "";
        if (fields.includes(name)) byField[name] = byField[name] ? `${byField[name]} ${sentence}` : sentence;
        else rest.push(sentence);
      }
    }
  }
  if (!Object.keys(byField).length) return { byField, general: describe(problem) };
  // The message itself (with its status prefix), and the violations no field here shows.
  const head = describe(new ApiError(problem.status, { ...problem.body, details: [] }));
  return { byField, general: [head, ...rest].filter(Boolean).join(" ") };
}

// What the sliders may reach: the pool's free share plus what the project holds already.
export function usePoolBounds(organizationId, project) {
  const [bounds, setBounds] = useState(null);
  const [error, setError] = useState("");
  useEffect(() => {
    let alive = true;
    api("GET", `/v1/organizations/${encodeURIComponent(organizationId)}/subscription`)
      .then((sub) => {
        if (!alive) return;
        const pool = sub.pool || {};
        const used = sub.allocated || {};
        const own = (project && project.resources) || {};
        setBounds({
          ramMax: Math.max(RAM_MIN, count(pool.ramMb) - count(used.ramMb) + count(own.ramMb)),
          cpuMax: Math.max(CPU_MIN, count(pool.cpuMillis) - count(used.cpuMillis) + count(own.cpuMillis)),
        });
      })
      .catch((problem) => alive && setError(describe(problem)));
    return () => {
      alive = false;
    };
  }, [organizationId, project && project.updatedAt]);
  return [bounds, error];
}

function FieldError({ name, errors }) {
  return errors[name]
    ? html`<small class="error field-error" role="alert" data-field=${name}>${errors[name]}</small>`
    : null;
}

// A range slider with its value beside it; `name` is the form field.
export function Slider({ label, name, min, max, step, value, unit, onInput, errors, hint }) {
  return html`<label class="field slider">
    <span class="label">${label}: <output name=${`${name}-value`} class="slider-value">${value} ${unit}</output></span>
    <input type="range" name=${name} min=${min} max=${max} step=${step || 1} value=${value}
      onInput=${(e) => onInput(Number(e.currentTarget.value))} />
    <small class="hint">${min}–${max} ${unit} (${hint || "the pool's free share plus what this project holds"})</small>
    <${FieldError} name=${name} errors=${errors} />
  </label>`;
}

const FIELDS = [
  "name",
  "description",
  "healthCheckPath",
  "sleepEnabled",
  "sleepAfterSeconds",
  "restartPolicy",
  "ramMb",
  "cpuMillis",
];

// The form's fields as a project's JSON: RAM and CPU are in its resources (only the ones
// given, so the update touches only those).
export function asProject(values) {
  const { ramMb, cpuMillis, ...rest } = values;
  const resources = {};
  if (ramMb !== undefined) resources.ramMb = ramMb;
  if (cpuMillis !== undefined) resources.cpuMillis = cpuMillis;
  return Object.keys(resources).length ? { ...rest, resources } : rest;
}

function initial(project) {
  return {
    name: project.name || "",
    description: project.description || "",
    healthCheckPath: project.healthCheckPath || "",
    sleepEnabled: Boolean(project.sleepEnabled),
    sleepAfterSeconds: count(project.sleepAfterSeconds) || 900,
    restartPolicy:
      !project.restartPolicy || project.restartPolicy === "RESTART_POLICY_UNSPECIFIED"
        ? "RESTART_POLICY_ON_FAILURE"
        : project.restartPolicy,
    ramMb: count(project.resources && project.resources.ramMb),
    cpuMillis: count(project.resources && project.resources.cpuMillis),
  };
}

export function ProjectSettings({ project, onSaved }) {
  const [values, setValues] = useState(() => initial(project));
  const [errors, setErrors] = useState({});
  const [general, setGeneral] = useState("");
  const [busy, setBusy] = useState(false);
  const [saved, setSaved] = useState(false);
  const [bounds, boundsError] = usePoolBounds(project.organizationId, project);
  // A saved (or otherwise changed) project: the form shows what the API now holds.
  useEffect(() => setValues(initial(project)), [project.updatedAt]);
  const set = (name) => (value) => {
    setSaved(false);
    setValues((v) => ({ ...v, [name]: value }));
  };
  const text = (name) => (e) => set(name)(e.currentTarget.value);

  async function onSubmit(event) {
    event.preventDefault();
    const before = initial(project);
    const changed = {};
    for (const name of FIELDS) {
      let value = values[name];
      if (name === "sleepAfterSeconds" || name === "ramMb" || name === "cpuMillis") value = Number(value);
      if (value !== before[name]) changed[name] = value;
    }
    setErrors({});
    setGeneral("");
    setSaved(false);
    if (!Object.keys(changed).length) {
      setGeneral("Nothing changed.");
      return;
    }
    setBusy(true);
    try {
      const updated = await api("PATCH", `/v1/projects/${encodeURIComponent(project.id)}`, asProject(changed));
      setSaved(true);
      onSaved(updated);
    } catch (problem) {
      const split = splitErrors(problem, FIELDS);
      setErrors(split.byField);
      setGeneral(split.general);
    } finally {
      setBusy(false);
    }
  }

  return html`<form name="project-settings" aria-label="Project settings" class="card form" onSubmit=${onSubmit} novalidate>
    <h3>Settings</h3>
    <div class="pair">
      <label class="field"><span class="label">Name</span>
        <input name="name" value=${values.name} onInput=${text("name")} maxlength="100" />
        <${FieldError} name="name" errors=${errors} /></label>
      <label class="field"><span class="label">Health check path</span>
        <input name="healthCheckPath" value=${values.healthCheckPath} onInput=${text("healthCheckPath")}
          placeholder="/" autocomplete="off" />
        <small class="hint">The agent polls it until the app answers; empty: /.</small>
        <${FieldError} name="healthCheckPath" errors=${errors} /></label>
    </div>
    <label class="field"><span class="label">Description</span>
      <input name="description" value=${values.description} onInput=${text("description")} />
      <${FieldError} name="description" errors=${errors} /></label>
    <div class="pair">
      <fieldset class="choice">
        <legend>Sleep when idle</legend>
        <label><input type="checkbox" name="sleepEnabled" checked=${values.sleepEnabled}
          onChange=${(e) => set("sleepEnabled")(e.currentTarget.checked)} /> stop idle containers, wake on the next request</label>
        <${FieldError} name="sleepEnabled" errors=${errors} />
      </fieldset>
      <label class="field"><span class="label">Sleep after (seconds)</span>
        <input type="number" name="sleepAfterSeconds" min=${SLEEP_MIN} max=${SLEEP_MAX}
          value=${values.sleepAfterSeconds} disabled=${!values.sleepEnabled}
          onInput=${text("sleepAfterSeconds")} />
        <${FieldError} name="sleepAfterSeconds" errors=${errors} /></label>
    </div>
    <label class="field"><span class="label">Restart policy</span>
      <select name="restartPolicy" onChange=${text("restartPolicy")}>
        ${RESTART.map(([v, t]) => html`<option key=${v} value=${v} selected=${v === values.restartPolicy}>${t}</option>`)}
      </select>
      <${FieldError} name="restartPolicy" errors=${errors} /></label>
    ${bounds
      ? html`<div class="pair">
          <${Slider} label="RAM" name="ramMb" min=${RAM_MIN} max=${bounds.ramMax} unit="MB"
            value=${values.ramMb} onInput=${set("ramMb")} errors=${errors} />
          <${Slider} label="CPU" name="cpuMillis" min=${CPU_MIN} max=${bounds.cpuMax} unit="mCPU"
            value=${values.cpuMillis} onInput=${set("cpuMillis")} errors=${errors} />
        </div>
        <p class="muted small">RAM and CPU apply to the next release (a deploy, a rollback or a config change).</p>`
      : html`<p class=${boundsError ? "error" : "loading"}>${boundsError || "Loading the pool…"}</p>`}
    <div class="actions">
      <button type="submit" disabled=${busy}>${busy ? "Working…" : "Save settings"}</button>
      ${saved ? html`<span class="ok" id="settings-saved" role="status">Saved.</span>` : null}
    </div>
    ${general ? html`<p class="error" role="alert" id="settings-error">${general}</p>` : null}
  </form>`;
}
