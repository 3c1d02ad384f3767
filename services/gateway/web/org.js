// The current organization's members and roles, billing and audit log; the platform's
// servers (platform admins only).

import { useState } from "./vendor/hooks.mjs";
import { api, listAll } from "./api.js";
import {
  ADMIN_ROLES,
  ActionButton,
  ActionForm,
  Field,
  ROLES,
  SelectField,
  bytesText,
  count,
  enumText,
  html,
  moneyText,
  roleText,
  usePolling,
  when,
} from "./ui.js";

const orgPath = (org) => `/v1/organizations/${encodeURIComponent(org.id)}`;
const ROLE_OPTIONS = ROLES.map((r) => [r, roleText(r)]);

function MemberRow({ org, member, isMe, canManage, onChanged }) {
  const path = `${orgPath(org)}/members/${encodeURIComponent(member.userId)}`;
  return html`<tr data-user-id=${member.userId} data-email=${member.email}>
    <td class="wrap"><span class="member-email">${member.email}</span>
      ${isMe ? html` <span class="badge">you</span>` : null}</td>
    <td class="member-role">${roleText(member.role)}</td>
    ${canManage
      ? html`<td class="member-controls">
          <${ActionForm}
            name="member-role"
            title=""
            submit="Change role"
            action=${async (data) => {
              await api("PATCH", path, { role: data.get("role") });
              onChanged();
            }}
          >
            <${SelectField}
              label=${`Role of ${member.email}`}
              name="role"
              options=${ROLE_OPTIONS}
              initial=${member.role}
            />
          <//>
          <${ActionButton}
            label="Remove"
            className="danger remove-member"
            aria-label=${`Remove ${member.email} from ${org.name}`}
            action=${async () => {
              await api("DELETE", path);
              onChanged();
            }}
          />
        </td>`
      : null}
  </tr>`;
}

export function MembersPage({ org, userId }) {
  const [members, error, reload] = usePolling(
    () => listAll(`${orgPath(org)}/members`, "members"),
    0,
    [org.id],
  );
  const me = (members || []).find((m) => m.userId === userId);
  const canManage = Boolean(me && ADMIN_ROLES.has(me.role));
  return html`<main id="main">
    <h1>Members <span class="muted">of ${org.name}</span></h1>
    <p class="muted">Your role here: <span id="my-role">${me ? roleText(me.role) : "…"}</span>.
      Viewers read; developers also deploy and edit projects and secrets; admins also manage
      members, billing and domains; owners also delete the organization.</p>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
    ${members === undefined
      ? html`<p class="loading">Loading members…</p>`
      : html`<table class="table" id="members">
          <caption class="sr-only">Members of ${org.name}</caption>
          <thead><tr><th scope="col">Email</th><th scope="col">Role</th>
            ${canManage ? html`<th scope="col">Change</th>` : null}</tr></thead>
          <tbody>
            ${members.map(
              (m) => html`<${MemberRow}
                key=${m.userId}
                org=${org}
                member=${m}
                isMe=${m.userId === userId}
                canManage=${canManage}
                onChanged=${reload}
              />`,
            )}
          </tbody>
        </table>`}
    ${canManage
      ? html`<${ActionForm}
          name="add-member"
          level=${2}
          title="Add a member"
          submit="Add member"
          after="reset"
          action=${async (data) => {
            await api("POST", `${orgPath(org)}/members`, {
              email: data.get("email"),
              role: data.get("role"),
            });
            reload();
          }}
        >
          <div class="pair">
            <${Field} label="Email of an existing Hangar user" name="email" type="email" required autocomplete="off" />
            <${SelectField} label="Role" name="role" options=${ROLE_OPTIONS} initial="ROLE_VIEWER" />
          </div>
        <//>`
      : null}
  </main>`;
}

// --- billing ---------------------------------------------------------------------------

async function billingOf(org) {
  const subscription = await api("GET", `${orgPath(org)}/subscription`);
  const [plan, usage] = await Promise.all([
    api("GET", `/v1/plans/${encodeURIComponent(subscription.planId)}`).catch(() => null),
    api("GET", `${orgPath(org)}/usage`).catch(() => null),
  ]);
  return { subscription, plan, usage };
}

const hours = (n) => n.toLocaleString(undefined, { maximumFractionDigits: n < 10 ? 2 : 0 });
const USAGE = {
  USAGE_METRIC_RAM_MB_SECONDS: ["Memory", (v) => `${hours(count(v) / 1024 / 3600)} GB·h`],
  USAGE_METRIC_CPU_MILLIS_SECONDS: ["CPU", (v) => `${hours(count(v) / 1000 / 3600)} CPU·h`],
  USAGE_METRIC_BANDWIDTH_BYTES: ["Bandwidth", bytesText],
};

function PoolRow({ label, used, pool, unit }) {
  const total = count(pool);
  const taken = count(used);
  return html`<tr data-resource=${label}>
    <th scope="row">${label}</th>
    <td>${taken} ${unit}</td>
    <td>${Math.max(0, total - taken)} ${unit}</td>
    <td>${total} ${unit}</td>
    <td><meter min="0" max=${total || 1} value=${taken} aria-label=${`${label} allocated`}></meter></td>
  </tr>`;
}

function Invoices({ org }) {
  const [invoices, error] = usePolling(() => listAll(`${orgPath(org)}/invoices`, "invoices"), 30, [org.id]);
  return html`<section aria-labelledby="invoices-title">
    <h2 id="invoices-title">Invoices</h2>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
    ${invoices && invoices.length === 0 ? html`<p class="notice" id="no-invoices">No invoices yet: one is made for each period with usage beyond the plan.</p>` : null}
    ${invoices && invoices.length
      ? html`<table class="table" id="invoices">
          <thead><tr><th scope="col">Period</th><th scope="col">Status</th><th scope="col">Total</th>
            <th scope="col">Stripe</th></tr></thead>
          <tbody>
            ${invoices.map(
              (inv) => html`<tr key=${inv.id} data-invoice-id=${inv.id}>
                <td>${when(inv.periodStart)} – ${when(inv.periodEnd)}</td>
                <td>${enumText(inv.status, "INVOICE_STATUS_")}</td>
                <td>${moneyText(inv.totalCents, inv.currency)}</td>
                <td class="wrap mono small">
                  ${inv.hostedInvoiceUrl
                    ? html`<a href=${inv.hostedInvoiceUrl} rel="noopener noreferrer" target="_blank">View and pay</a>`
                    : inv.stripeInvoiceId || (inv.sent ? "sent" : "not sent to Stripe")}
                </td>
              </tr>`,
            )}
          </tbody>
        </table>`
      : null}
  </section>`;
}

function ChangePlan({ org, current, onChanged }) {
  const [plans] = usePolling(() => listAll("/v1/plans", "plans"), 0, []);
  if (!plans) return null;
  return html`<${ActionForm}
    name="change-plan"
    title="Change plan"
    submit="Change plan"
    action=${async (data) => {
      await api("POST", `${orgPath(org)}/subscription:change`, { planId: data.get("planId") });
      onChanged();
    }}
  >
    <p class="small muted">A smaller plan is refused while the projects' allocations exceed its pool.</p>
    <${SelectField}
      label="Plan"
      name="planId"
      initial=${current}
      options=${plans.map((p) => [
        p.id,
        `${p.name}: ${moneyText(p.priceCents)}, ${count(p.included && p.included.ramMb)} MB RAM, ${count(p.included && p.included.cpuMillis)} mCPU`,
      ])}
    />
  <//>`;
}

export function BillingPage({ org, role }) {
  const [billing, error, reload] = usePolling(() => billingOf(org), 30, [org.id]);
  const sub = billing && billing.subscription;
  const plan = billing && billing.plan;
  const usage = billing && billing.usage;
  const pool = (sub && sub.pool) || {};
  const used = (sub && sub.allocated) || {};
  return html`<main id="main">
    <h1>Billing <span class="muted">of ${org.name}</span></h1>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
    ${!billing && !error ? html`<p class="loading">Loading billing…</p>` : null}
    ${sub
      ? html`<dl class="facts" id="subscription">
          <dt>Plan</dt>
          <dd id="plan-name">${plan ? plan.name : sub.planId}${plan
            ? html` <span class="muted">(${moneyText(plan.priceCents)} per period)</span>`
            : null}</dd>
          <dt>Status</dt><dd id="subscription-status">${enumText(sub.status, "SUBSCRIPTION_STATUS_")}</dd>
          <dt>This period</dt><dd>${when(sub.currentPeriodStart)} – ${when(sub.currentPeriodEnd)}</dd>
        </dl>
        <h2>Resource pool</h2>
        <table class="table" id="pool">
          <thead><tr><th scope="col">Resource</th><th scope="col">Allocated</th><th scope="col">Left</th>
            <th scope="col">Pool</th><th scope="col"><span class="sr-only">Share</span></th></tr></thead>
          <tbody>
            <${PoolRow} label="RAM" used=${used.ramMb} pool=${pool.ramMb} unit="MB" />
            <${PoolRow} label="CPU" used=${used.cpuMillis} pool=${pool.cpuMillis} unit="mCPU" />
          </tbody>
        </table>
        ${pool.bandwidthGb ? html`<p class="muted small">Bandwidth pool: ${pool.bandwidthGb} GB (what the plan includes each period is under usage).</p>` : null}`
      : null}
    ${usage
      ? html`<h2>Usage this period</h2>
          <table class="table" id="usage">
            <thead><tr><th scope="col">Metric</th><th scope="col">Used</th><th scope="col">Included</th>
              <th scope="col">Overage</th><th scope="col">Overage cost</th></tr></thead>
            <tbody>
              ${(usage.metrics || []).map((m) => {
                const [label, fmt] = USAGE[m.metric] || [enumText(m.metric, "USAGE_METRIC_"), (v) => String(count(v))];
                return html`<tr key=${m.metric} data-metric=${m.metric}>
                  <th scope="row">${label}</th><td>${fmt(m.used)}</td><td>${fmt(m.included)}</td>
                  <td>${fmt(m.overage)}</td><td>${moneyText(m.overageCents)}</td>
                </tr>`;
              })}
            </tbody>
          </table>`
      : null}
    ${sub && ADMIN_ROLES.has(role)
      ? html`<${ChangePlan} org=${org} current=${sub.planId} onChanged=${reload} />`
      : null}
    <${Invoices} org=${org} />
  </main>`;
}

// --- audit log -------------------------------------------------------------------------

const AUDIT_PAGE = 20;

function actorText(actorId, emails) {
  if (emails.has(actorId)) return emails.get(actorId);
  if (actorId.startsWith("service:")) return actorId.replace("service:", "service ");
  return actorId;
}

export function AuditPage({ org }) {
  const [filters, setFilters] = useState({ action: "", actor: "" });
  const [tokens, setTokens] = useState([""]); // page tokens of the pages seen, for "Newer"
  const pageToken = tokens[tokens.length - 1];
  const [members] = usePolling(() => listAll(`${orgPath(org)}/members`, "members"), 0, [org.id]);
  const [page, error] = usePolling(
    () => {
      const query = new URLSearchParams({ pageSize: String(AUDIT_PAGE) });
      if (filters.action) query.set("action", filters.action);
      if (filters.actor) query.set("actorId", filters.actor);
      if (pageToken) query.set("pageToken", pageToken);
      return api("GET", `${orgPath(org)}/audit-logs?${query}`);
    },
    0,
    [org.id, filters.action, filters.actor, pageToken],
  );
  const [chain, setChain] = useState(null);
  const emails = new Map((members || []).map((m) => [m.userId, m.email]));
  const entries = (page && page.auditLogs) || [];
  return html`<main id="main">
    <h1>Audit log <span class="muted">of ${org.name}</span></h1>
    <form name="audit-filter" class="card form filters" aria-label="Filter the audit log"
      onSubmit=${(e) => {
        e.preventDefault();
        const data = new FormData(e.currentTarget);
        setFilters({ action: String(data.get("action") || "").trim(), actor: String(data.get("actor") || "") });
        setTokens([""]);
      }}>
      <div class="pair">
        <${Field} label="Action" name="action" placeholder="member.role_changed" hint="An exact action name; empty for any." />
        <${SelectField}
          label="Actor"
          name="actor"
          options=${[["", "anyone"], ...(members || []).map((m) => [m.userId, m.email])]}
        />
      </div>
      <div class="actions"><button type="submit">Filter</button></div>
    </form>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
    ${page && entries.length === 0 ? html`<p class="notice" id="no-audit">No entries match.</p>` : null}
    ${entries.length
      ? html`<table class="table" id="audit">
          <caption class="sr-only">Audit log entries, newest first</caption>
          <thead><tr><th scope="col">When</th><th scope="col">Actor</th><th scope="col">Action</th>
            <th scope="col">Target</th><th scope="col">Details</th></tr></thead>
          <tbody>
            ${entries.map(
              (e) => html`<tr key=${e.id} data-action=${e.action}>
                <td>${when(e.occurredAt)}</td>
                <td class="wrap audit-actor">${actorText(e.actorId, emails)}</td>
                <td class="audit-action mono">${e.action}</td>
                <td class="wrap small">${e.targetType} ${emails.get(e.targetId) || e.targetId}</td>
                <td class="wrap mono small audit-details">${e.metadata && Object.keys(e.metadata).length ? JSON.stringify(e.metadata) : ""}</td>
              </tr>`,
            )}
          </tbody>
        </table>`
      : null}
    <div class="actions pager">
      <button type="button" id="audit-newer" disabled=${tokens.length < 2}
        onClick=${() => setTokens(tokens.slice(0, -1))}>Newer</button>
      <button type="button" id="audit-older" disabled=${!(page && page.nextPageToken)}
        onClick=${() => setTokens([...tokens, page.nextPageToken])}>Older</button>
    </div>
    <section aria-labelledby="chain-title">
      <h2 id="chain-title">Integrity</h2>
      <p class="muted small">Each entry's hash covers the one before it; a check recomputes the whole chain.</p>
      <${ActionButton}
        label="Verify the chain"
        id="verify-chain"
        action=${async () => setChain(await api("GET", `${orgPath(org)}/audit-logs:verify`))}
      />
      ${chain
        ? html`<p id="chain-result" class=${chain.ok ? "" : "error"}>${chain.ok
            ? `Intact: ${count(chain.checked)} entries checked.`
            : `Broken at entry ${chain.firstBrokenEntryId} (${count(chain.checked)} checked).`}</p>`
        : null}
    </section>
  </main>`;
}

// --- servers (platform admins) ---------------------------------------------------------

export function ServersPage() {
  const [servers, error, reload] = usePolling(() => listAll("/v1/servers", "servers"), 10, []);
  return html`<main id="main">
    <h1>Servers</h1>
    <p class="muted">The machines that run apps, as runtime sees them (platform admins only).</p>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
    ${servers && servers.length === 0 ? html`<p class="notice">No servers registered.</p>` : null}
    ${servers && servers.length
      ? html`<table class="table" id="servers">
          <thead><tr><th scope="col">Name</th><th scope="col">Status</th><th scope="col">Region</th>
            <th scope="col">RAM reserved</th><th scope="col">CPU reserved</th><th scope="col">Isolation</th>
            <th scope="col">Last heartbeat</th><th scope="col"><span class="sr-only">Actions</span></th></tr></thead>
          <tbody>
            ${servers.map(
              (s) => html`<tr key=${s.id} data-server-id=${s.id}>
                <td class="wrap"><strong class="server-name">${s.name}</strong>
                  <div class="muted small mono">${s.agentAddress}</div></td>
                <td>${enumText(s.status, "SERVER_STATUS_")}</td>
                <td>${s.region}</td>
                <td>${count(s.reserved && s.reserved.ramMb)} / ${count(s.capacity && s.capacity.ramMb)} MB</td>
                <td>${count(s.reserved && s.reserved.cpuMillis)} / ${count(s.capacity && s.capacity.cpuMillis)} mCPU</td>
                <td>${enumText(s.isolation, "SERVER_ISOLATION_")}</td>
                <td>${when(s.lastHeartbeatAt)}</td>
                <td>${s.status === "SERVER_STATUS_ACTIVE"
                  ? html`<${ActionButton}
                      label="Drain"
                      className="danger"
                      aria-label=${`Drain ${s.name}: no new placements`}
                      action=${async () => {
                        await api("POST", `/v1/servers/${encodeURIComponent(s.id)}:drain`, {});
                        reload();
                      }}
                    />`
                  : null}</td>
              </tr>`,
            )}
          </tbody>
        </table>`
      : null}
  </main>`;
}
