// Small building blocks shared by the pages. Everything a user or the API controls is passed
// to Preact as a child or an attribute value, which Preact sets as text (createTextNode) or as
// a property: never as HTML. Nothing here asks the browser to parse a string as markup.

import { h } from "./vendor/preact.mjs";
import { useEffect, useRef, useState } from "./vendor/hooks.mjs";
import htm from "./vendor/htm.mjs";
import { describe } from "./api.js";

export const html = htm.bind(h);

export const WRITE_ROLES = new Set(["ROLE_DEVELOPER", "ROLE_ADMIN", "ROLE_OWNER"]);
export const ADMIN_ROLES = new Set(["ROLE_ADMIN", "ROLE_OWNER"]);

export function enumText(value, prefix) {
  if (!value) return "";
  return value.replace(prefix, "").toLowerCase().replace(/_/g, " ");
}

export const statusText = (s) => enumText(s, "DEPLOYMENT_STATUS_") || "none";
export const reasonText = (r) => enumText(r, "RELEASE_REASON_");
export const roleText = (r) => enumText(r, "ROLE_");

export function when(timestamp) {
  if (!timestamp) return "";
  const date = new Date(timestamp);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleString();
}

export function slugify(name) {
  return name
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+|-+$/g, "")
    .slice(0, 40)
    .replace(/-+$/g, "");
}

// Only http(s) addresses become links: a URL from the API is never a javascript: link.
export function SafeLink({ href, children, ...rest }) {
  if (typeof href !== "string" || !/^https?:\/\//i.test(href)) return html`<span>${children}</span>`;
  return html`<a href=${href} rel="noopener noreferrer" target="_blank" ...${rest}>${children}</a>`;
}

export function Status({ status }) {
  const text = statusText(status);
  return html`<span class=${`status status-${text.replace(/ /g, "-")}`}>${text}</span>`;
}

// A labelled input: the label wraps its control, so a click or a screen reader finds it.
export function Field({ label, hint, ...input }) {
  return html`<label class="field">
    <span class="label">${label}</span>
    <input ...${input} />
    ${hint ? html`<small class="hint">${hint}</small>` : null}
  </label>`;
}

// A form that calls `action(FormData, form)`, shows "Working…" meanwhile, and the API's error
// as sentences next to its button (role=alert, so screen readers announce it). Its title is an
// h3 (a form in a page's section) or, with level=2, an h2 (a form right under the page's h1).
export function ActionForm({ name, title, action, submit, disabled, children, after, level }) {
  const Heading = level === 2 ? "h2" : "h3";
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  async function onSubmit(event) {
    event.preventDefault();
    const form = event.currentTarget;
    setBusy(true);
    setError("");
    try {
      await action(new FormData(form), form);
      if (after === "reset") form.reset();
    } catch (problem) {
      setError(describe(problem));
    } finally {
      setBusy(false);
    }
  }
  return html`<form name=${name} aria-label=${title} class="card form" onSubmit=${onSubmit}>
    ${title ? html`<${Heading}>${title}<//>` : null}
    ${children}
    <div class="actions">
      <button type="submit" disabled=${busy || disabled}>${busy ? "Working…" : submit}</button>
    </div>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
  </form>`;
}

// A button that runs an API call, with its error shown beside it.
export function ActionButton({ action, label, busyLabel, className, ...rest }) {
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  async function onClick() {
    setBusy(true);
    setError("");
    try {
      await action();
    } catch (problem) {
      setError(describe(problem));
    } finally {
      setBusy(false);
    }
  }
  return html`<span class="action-button">
    <button type="button" class=${className || ""} disabled=${busy} onClick=${onClick} ...${rest}>
      ${busy ? busyLabel || "Working…" : label}
    </button>
    ${error ? html`<span class="error" role="alert">${error}</span>` : null}
  </span>`;
}

// Runs `load` now and every `seconds` while mounted (and again when `deps` change); the
// latest result, the latest error as a sentence, and a function to load again at once.
export function usePolling(load, seconds, deps) {
  const [value, setValue] = useState(undefined);
  const [error, setError] = useState("");
  const latest = useRef(load);
  latest.current = load;
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let alive = true;
    let timer = null;
    async function run() {
      try {
        const result = await latest.current();
        if (!alive) return;
        setValue(result);
        setError("");
      } catch (problem) {
        if (alive) setError(describe(problem));
      }
      if (alive && seconds) timer = setTimeout(run, seconds * 1000);
    }
    run();
    return () => {
      alive = false;
      if (timer) clearTimeout(timer);
    };
  }, [...deps, tick]);
  return [value, error, () => setTick((n) => n + 1)];
}

export const ROLES = ["ROLE_VIEWER", "ROLE_DEVELOPER", "ROLE_ADMIN", "ROLE_OWNER"];

// A labelled <select> of `options` ([value, text] pairs), starting at `initial`: marked on
// its option, since a <select>'s own default value is set before its options exist.
export function SelectField({ label, options, initial, ...select }) {
  return html`<label class="field">
    <span class="label">${label}</span>
    <select ...${select}>
      ${options.map(
        ([value, text]) => html`<option key=${value} value=${value} selected=${value === initial}>${text}</option>`,
      )}
    </select>
  </label>`;
}

// A whole number from the API: int64 fields arrive as JSON strings (proto3 JSON mapping).
export function count(value) {
  const n = Number(value || 0);
  return Number.isFinite(n) ? n : 0;
}

// A resources message (a project's size) as text: "256 MB · 250 mCPU".
export function resourcesText(resources) {
  const r = resources || {};
  return `${count(r.ramMb)} MB · ${count(r.cpuMillis)} mCPU`;
}

export function bytesText(bytes) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let n = count(bytes);
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

export function moneyText(cents, currency) {
  const code = (currency || "usd").toUpperCase();
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency: code }).format(count(cents) / 100);
  } catch {
    return `${(count(cents) / 100).toFixed(2)} ${code}`;
  }
}
