// A project's custom domains: list, add, verify, remove (admins and owners change them).

import { api } from "./api.js";
import { ActionButton, ActionForm, Field, enumText, html, usePolling, when } from "./ui.js";

function Instructions({ domain }) {
  return html`<div class="small verification">
    Point <code>${domain.hostname}</code> at this platform's edge, which then answers
    <code class="verification-url">http://${domain.hostname}${domain.verificationPath}</code>
    with <code class="verification-token">${domain.verificationToken}</code>; then verify.
  </div>`;
}

export function Domains({ projectId, canAdmin }) {
  const path = `/v1/projects/${encodeURIComponent(projectId)}/domains`;
  const [domains, error, reload] = usePolling(
    async () => (await api("GET", path)).domains || [],
    0,
    [projectId],
  );
  return html`<section aria-labelledby="domains-title">
    <h2 id="domains-title">Custom domains</h2>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
    ${domains && domains.length === 0 ? html`<p class="notice" id="no-domains">No custom domains.</p>` : null}
    ${domains && domains.length
      ? html`<ul class="list" id="domains">
          ${domains.map((d) => {
            const status = enumText(d.status, "DOMAIN_STATUS_");
            const one = `${path}/${encodeURIComponent(d.hostname)}`;
            return html`<li key=${d.hostname} class="row domain" data-hostname=${d.hostname}>
              <span class="grow">
                <strong class="domain-name">${d.hostname}</strong>
                ${" "}<span class=${`status domain-status status-${status}`}>${status}</span>
                ${d.verifiedAt ? html`<span class="muted small"> since ${when(d.verifiedAt)}</span>` : null}
                ${d.status === "DOMAIN_STATUS_PENDING" ? html`<${Instructions} domain=${d} />` : null}
              </span>
              ${canAdmin && d.status === "DOMAIN_STATUS_PENDING"
                ? html`<${ActionButton}
                    label="Verify"
                    busyLabel="Checking…"
                    className="verify-domain"
                    aria-label=${`Verify ${d.hostname}`}
                    action=${async () => {
                      await api("POST", `${one}:verify`, {});
                      reload();
                    }}
                  />`
                : null}
              ${canAdmin
                ? html`<${ActionButton}
                    label="Remove"
                    className="danger remove-domain"
                    aria-label=${`Remove ${d.hostname}`}
                    action=${async () => {
                      await api("DELETE", one);
                      reload();
                    }}
                  />`
                : null}
            </li>`;
          })}
        </ul>`
      : null}
    ${canAdmin
      ? html`<${ActionForm}
          name="add-domain"
          title="Add a custom domain"
          submit="Add domain"
          after="reset"
          action=${async (data) => {
            await api("POST", path, { hostname: String(data.get("hostname") || "").trim().toLowerCase() });
            reload();
          }}
        >
          <${Field} label="Hostname" name="hostname" required placeholder="www.example.com" autocomplete="off"
            hint="It stays pending until it reaches this platform's edge and is verified." />
        <//>`
      : null}
  </section>`;
}
