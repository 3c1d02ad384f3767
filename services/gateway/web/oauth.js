// Log in with an OpenID Connect provider: the implicit id_token flow, which fits the page's CSP
// (connect-src 'self'): the browser never calls the provider, it is sent there (a top-level
// navigation) and comes back to this page with the id_token in the URL's fragment, which
// only this page reads and the server never sees in a request line.
//
// 1. The log-in page lists GET /v1/auth/oauth/providers as "Continue with <label>" buttons.
// 2. A click keeps a random `state` and `nonce` in sessionStorage (this tab only) and goes to
//    the provider's authorization endpoint: response_type=id_token, response_mode=fragment,
//    redirect_uri = this page (origin + "/": a redirect URI may carry no fragment).
// 3. The provider sends the browser back to `/#id_token=...&state=...` (or `#error=...`).
//    takeOAuthResponse(), called before the app renders, moves the answer out of the address
//    bar and history into memory and routes to #/oauth, where OAuthCallbackPage checks
//    `state` and posts the id_token with the nonce to POST /v1/auth/oauth/login (identity
//    verifies the token, and that its `nonce` claim is this one).

import { useEffect, useState } from "./vendor/hooks.mjs";
import { describe, loginWithOAuth, oauthProviders } from "./api.js";
import { html } from "./ui.js";

const PENDING_KEY = "hangar.oauth"; // the sign-in this tab started: provider, label, state, nonce
export const CALLBACK_ROUTE = "#/oauth";
const AGAIN = "Start again from the log-in page.";

let answer = null; // the provider's answer (URLSearchParams), once taken out of the URL

function randomToken() {
  const bytes = new Uint8Array(32);
  crypto.getRandomValues(bytes);
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function start(provider) {
  const url = new URL(provider.authorizationEndpoint);
  if (url.protocol !== "https:" && url.protocol !== "http:") {
    throw new Error(`the sign-in address of ${provider.label || provider.name} is not a web address`);
  }
  const pending = {
    provider: provider.name,
    label: provider.label || provider.name,
    state: randomToken(),
    nonce: randomToken(),
  };
  sessionStorage.setItem(PENDING_KEY, JSON.stringify(pending));
  const scopes = new Set(["openid", ...(provider.scopes || [])]);
  const request = {
    response_type: "id_token",
    response_mode: "fragment",
    client_id: provider.clientId,
    redirect_uri: `${location.origin}/`,
    scope: [...scopes].join(" "),
    state: pending.state,
    nonce: pending.nonce,
  };
  for (const [name, value] of Object.entries(request)) url.searchParams.set(name, value);
  location.assign(url.href);
}

// The provider's answer in the URL's fragment, if there is one: kept in memory, replaced in
// the address bar (and this history entry) by #/oauth. Returns whether there was one.
export function takeOAuthResponse() {
  const fragment = location.hash.replace(/^#/, "");
  if (!fragment || fragment.startsWith("/")) return false; // a route of the dashboard
  const params = new URLSearchParams(fragment);
  if (!params.has("id_token") && !params.has("error") && !params.has("state")) return false;
  answer = params;
  history.replaceState(null, "", `${location.pathname}${location.search}${CALLBACK_ROUTE}`);
  return true;
}

function takePending() {
  const text = sessionStorage.getItem(PENDING_KEY);
  sessionStorage.removeItem(PENDING_KEY); // one answer per sign-in started
  try {
    const pending = text ? JSON.parse(text) : null;
    return pending && pending.provider && pending.state && pending.nonce ? pending : null;
  } catch {
    return null;
  }
}

const PROVIDER_ERRORS = {
  access_denied: (label) => `you declined it, or ${label} refused it`,
  login_required: (label) => `${label} wants you to sign in there first`,
  interaction_required: (label) => `${label} needs you to answer a question there first`,
  consent_required: (label) => `${label} needs your consent first`,
  server_error: (label) => `${label} had a problem; try again shortly`,
  temporarily_unavailable: (label) => `${label} is unavailable right now; try again shortly`,
};

function providerProblem(params, label) {
  const code = params.get("error");
  const why = PROVIDER_ERRORS[code] ? PROVIDER_ERRORS[code](label) : `${label} answered "${code}"`;
  const detail = params.get("error_description");
  return `The sign-in with ${label} did not complete: ${why}${detail ? ` (${detail})` : ""}. ${AGAIN}`;
}

// The signed-in user, or an Error whose message is the sentence to show.
async function finish(params, pending) {
  if (!params) throw new Error(`There is no sign-in answer to finish here. ${AGAIN}`);
  const label = pending ? pending.label : "the provider";
  if (params.has("error")) throw new Error(providerProblem(params, label));
  if (!pending) {
    throw new Error(`This tab did not start a sign-in (or it already finished), so the answer was refused. ${AGAIN}`);
  }
  if (params.get("state") !== pending.state) {
    throw new Error(
      `The answer from ${label} does not match the sign-in this tab started (its state differs), so it was refused. ${AGAIN}`,
    );
  }
  const idToken = params.get("id_token");
  if (!idToken) throw new Error(`${label} answered without an id_token, so nobody was signed in. ${AGAIN}`);
  return loginWithOAuth(pending.provider, idToken, pending.nonce);
}

export function OAuthCallbackPage({ onSignedIn }) {
  const [problem, setProblem] = useState("");
  useEffect(() => {
    const params = answer;
    answer = null;
    finish(params, takePending())
      .then((user) => onSignedIn(user))
      .catch((error) => setProblem(describe(error)));
  }, []);
  return html`<main class="narrow" id="main">
    <h1>${problem ? "Not signed in" : "Signing in…"}</h1>
    ${problem
      ? html`<p class="error" role="alert" id="oauth-problem">${problem}</p>`
      : html`<p class="loading">Checking the provider's answer…</p>`}
    <p><a href="#/login">Back to log in</a></p>
  </main>`;
}

// One "Continue with <label>" button per provider; nothing when none is configured (or the
// list cannot be read: the password form still works).
export function OAuthButtons() {
  const [providers, setProviders] = useState([]);
  const [problem, setProblem] = useState("");
  useEffect(() => {
    let alive = true;
    oauthProviders()
      .then((list) => alive && setProviders(list))
      .catch(() => {});
    return () => {
      alive = false;
    };
  }, []);
  if (!providers.length) return null;
  return html`<section class="card oauth" aria-label="Log in with another account">
    <div class="actions">
      ${providers.map(
        (provider) => html`<button
          key=${provider.name}
          type="button"
          class="secondary"
          data-provider=${provider.name}
          onClick=${() => {
            try {
              start(provider);
            } catch (error) {
              setProblem(describe(error));
            }
          }}
        >Continue with ${provider.label || provider.name}</button>`,
      )}
    </div>
    ${problem ? html`<p class="error" role="alert">${problem}</p>` : null}
  </section>`;
}
