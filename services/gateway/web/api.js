// The public HTTP API (/v1/...), as the CLI uses it, plus the session.
//
// The session: the access token in memory only; the refresh token in the gateway's HttpOnly
// `hangar_refresh` cookie (Path=/v1/auth), which no script can read. The auth calls opt in
// with the X-Hangar-Session header (also the gateway's CSRF check) and are the only requests
// that send cookies; every other call carries the access token alone.

const SESSION_HEADER = { "X-Hangar-Session": "cookie" };
const REFRESH_LOCK = "hangar.refresh";

let accessToken = "";
let refreshing = null; // one refresh at a time: refresh tokens rotate, reuse ends the family
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, body) {
    super(body && typeof body.message === "string" ? body.message : `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
  get reason() {
    const info = (this.body.details || []).find((d) => d.reason);
    return info ? info.reason : "";
  }
}

export function onSessionChange(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

function announce(user) {
  for (const listener of listeners) listener(user);
}

function remember(auth) {
  accessToken = auth.accessToken || "";
  return auth.user || null;
}

function forget() {
  accessToken = "";
}

export function signedIn() {
  return accessToken !== "";
}

// A Blob body is sent as it is, with its own type; anything else as JSON. `session`: an auth
// call that sends and receives the session cookie.
async function send(method, path, body, token, session = false) {
  const headers = session ? { Accept: "application/json", ...SESSION_HEADER } : { Accept: "application/json" };
  const raw = body instanceof Blob;
  if (body !== undefined) headers["Content-Type"] = raw ? body.type : "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined || raw ? body : JSON.stringify(body),
      credentials: session ? "same-origin" : "omit",
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, { message: "the Hangar API cannot be reached" });
  }
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : {};
  } catch {
    parsed = { message: text.slice(0, 200) };
  }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
}

// The cookie's token rotates on use and is shared by this browser's tabs: a refresh holds a
// lock across them (Web Locks; where absent, one refresh at a time in this tab only).
function exclusively(task) {
  if (globalThis.navigator && navigator.locks && navigator.locks.request) {
    return navigator.locks.request(REFRESH_LOCK, task);
  }
  return task();
}

async function refresh() {
  if (!refreshing) {
    refreshing = exclusively(() => send("POST", "/v1/auth/refresh", {}, "", true))
      .then((auth) => {
        remember(auth);
        return true;
      })
      .catch(() => {
        forget();
        return false;
      })
      .finally(() => {
        refreshing = null;
      });
  }
  return refreshing;
}

// An authenticated call; on 401 the access token is renewed once and the call repeated.
// `body`: a JSON value, or a Blob sent raw with its type (an upload).
export async function api(method, path, body) {
  if (!accessToken && !(await refresh())) {
    announce(null);
    throw new ApiError(401, { message: "you are not signed in" });
  }
  try {
    return await send(method, path, body, accessToken);
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 401) throw error;
    if (!(await refresh())) {
      announce(null);
      throw error;
    }
    return send(method, path, body, accessToken);
  }
}

// A server-streaming call answered as newline-delimited JSON (the gateway's framing:
// `{"result": message}` per line, then `{"error": status}` if the stream breaks). Calls
// `onMessage(result)` per line until the stream ends (resolves) or fails (throws an
// ApiError). The access token goes in the Authorization header, renewed once on a 401
// before any line arrived; `onOpen()` once the response has started. Throws a TypeError("streaming") when this browser cannot read a
// response body as a stream.
export async function stream(path, onMessage, signal, onOpen) {
  if (!accessToken && !(await refresh())) {
    announce(null);
    throw new ApiError(401, { message: "you are not signed in" });
  }
  let response = await open(path, signal);
  if (response.status === 401) {
    if (!(await refresh())) {
      announce(null);
      throw new ApiError(401, { message: "your session ended" });
    }
    response = await open(path, signal);
  }
  if (!response.ok) {
    const text = await response.text();
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = { message: text.slice(0, 200) };
    }
    throw new ApiError(response.status, parsed);
  }
  if (!response.body || typeof response.body.getReader !== "function" || typeof TextDecoder !== "function") {
    throw new TypeError("streaming");
  }
  if (onOpen) onOpen();
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  const handle = (line) => {
    if (!line.trim()) return;
    const message = JSON.parse(line);
    if (message.error) throw new ApiError(HTTP_OF_GRPC[message.error.code] || 500, message.error);
    onMessage(message.result || {});
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        handle(line);
      }
    }
    handle(buffered + decoder.decode());
  } finally {
    reader.cancel().catch(() => {});
  }
}

const HTTP_OF_GRPC = { 3: 400, 16: 401, 7: 403, 5: 404, 6: 409, 10: 409, 9: 400, 8: 429, 14: 503, 4: 504 };

async function open(path, signal) {
  try {
    return await fetch(path, {
      method: "GET",
      headers: { Accept: "application/x-ndjson", Authorization: `Bearer ${accessToken}` },
      credentials: "omit",
      cache: "no-store",
      signal,
    });
  } catch (error) {
    if (signal && signal.aborted) throw error;
    throw new ApiError(0, { message: "the Hangar API cannot be reached" });
  }
}

export async function resume() {
  if (!(await refresh())) return null;
  return api("GET", "/v1/users/me");
}

export async function login(email, password) {
  return remember(await send("POST", "/v1/auth/login", { email, password }, "", true));
}

// The OpenID Connect providers a sign-in can start with (anonymous; none configured: []).
export async function oauthProviders() {
  return (await send("GET", "/v1/auth/oauth/providers")).providers || [];
}

// Signs in with a provider's id_token; `nonce` is the one this tab sent it (identity checks it).
export async function loginWithOAuth(provider, idToken, nonce) {
  return remember(await send("POST", "/v1/auth/oauth/login", { provider, idToken, nonce }, "", true));
}

export async function signUp(email, password, name) {
  const body = { email, password, name };
  if (globalThis.crypto && crypto.randomUUID) body.requestId = crypto.randomUUID();
  return remember(await send("POST", "/v1/auth/signup", body, "", true));
}

// Ends the session (the cookie's refresh-token family) and clears the cookie.
export async function logout() {
  try {
    await exclusively(() => send("POST", "/v1/auth/logout", {}, accessToken, true));
  } catch {
    // Signed out here all the same; the gateway cleared the cookie whatever identity said.
  } finally {
    forget();
    announce(null);
  }
}

// Every page of a list call: `key` names the repeated field of the response.
export async function listAll(path, key, pageSize = 100) {
  const items = [];
  let pageToken = "";
  for (let page = 0; page < 50; page++) {
    const sep = path.includes("?") ? "&" : "?";
    const query = `pageSize=${pageSize}` + (pageToken ? `&pageToken=${encodeURIComponent(pageToken)}` : "");
    const reply = await api("GET", `${path}${sep}${query}`);
    items.push(...(reply[key] || []));
    pageToken = reply.nextPageToken || "";
    if (!pageToken) break;
  }
  return items;
}

const PREFIX = {
  0: "",
  400: "",
  401: "You are not signed in: ",
  403: "Not allowed: ",
  404: "Not found: ",
  409: "Conflict: ",
  413: "Too large: ",
  429: "Too many requests, try again shortly: ",
};

function sentence(text) {
  const trimmed = String(text || "").trim();
  if (!trimmed) return "";
  const first = trimmed[0].toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(first) ? first : `${first}.`;
}

// An error as one or more readable sentences, for the text next to a form.
export function describe(error) {
  if (!(error instanceof ApiError)) return sentence(error && error.message ? error.message : String(error));
  const prefix = error.status >= 500 ? "The server could not do it right now: " : PREFIX[error.status] || "";
  const parts = [sentence(prefix + error.message)];
  for (const detail of error.body.details || []) {
    for (const v of detail.fieldViolations || []) {
      const line = sentence(v.field ? `${v.field}: ${v.description}` : v.description);
      if (line && !parts.includes(line)) parts.push(line);
    }
  }
  return parts.join(" ");
}

// The signed-in user's role in an organization ("ROLE_VIEWER", ...; "" if not a member).
export async function roleIn(orgId, userId) {
  const members = await listAll(`/v1/organizations/${encodeURIComponent(orgId)}/members`, "members");
  const me = members.find((m) => m.userId === userId);
  return me ? me.role : "";
}
