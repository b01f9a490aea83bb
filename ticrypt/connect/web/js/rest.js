// rest's API through connect's relay: METHOD /rest/v1/<path> with the page
// token, and the rest session (POST /v1/auth/login) in X-Ticrypt-Session.
//
// The rest session is kept in sessionStorage ("ticrypt.rest") for this tab
// only.  A 401 of rest for a dead session (expired, revoked, disabled,
// unknown) drops it and tells the listeners of onSessionLost, so the page
// goes back to sign-in with the reason.

import { ApiError, apiFetch } from "./connectapi.js";
import { Listeners } from "./listeners.js";

const REST_KEY = "ticrypt.rest";
const SESSION_DEAD = new Set(["missing-token", "invalid-token", "session-expired",
  "session-revoked", "user-disabled"]);

const lost = new Listeners();

/** cb(ApiError) when rest ended the session; the function that stops it. */
export function onSessionLost(cb) {
  return lost.add(cb);
}

/** {token, user, role, expires} of the signed-in user, or null. */
export function restSession() {
  try {
    const s = JSON.parse(sessionStorage.getItem(REST_KEY) || "null");
    return s && typeof s.token === "string" ? s : null;
  } catch {
    return null;
  }
}

export function setRestSession(session) {
  sessionStorage.setItem(REST_KEY, JSON.stringify(session));
  watchSessionExpiry();
}

export function clearRestSession() {
  watchSessionExpiry(null);
  try {
    sessionStorage.removeItem(REST_KEY);
  } catch { /* nothing kept */ }
}

// When the session's time is up (rest's "expires"), the page asks rest
// (GET /v1/me): rest's 401 session-expired ends it through onSessionLost
// like any other call, so the page shows sign-in with rest's reason even
// if the user does nothing.  rest decides, not this browser's clock: if
// rest still takes the session (clocks apart), or cannot be asked, the
// page asks again later.
const EXPIRY_SLACK_MS = 500;
const EXPIRY_RECHECK_MS = 30000;
const MAX_TIMER_MS = 2 ** 31 - 1;
let expiryTimer = null;

/** (Re)arm the expiry check for the kept session (none: `null`). */
export function watchSessionExpiry(session = restSession(), delayMs = null) {
  clearTimeout(expiryTimer);
  expiryTimer = null;
  if (!session || !Number.isFinite(session.expires)) return;
  const due = delayMs ?? session.expires * 1000 - Date.now() + EXPIRY_SLACK_MS;
  expiryTimer = setTimeout(() => checkExpiry(session.token),
    Math.min(Math.max(due, 0), MAX_TIMER_MS));
}

async function checkExpiry(token) {
  expiryTimer = null;
  const session = restSession();
  if (!session || session.token !== token) return;
  try {
    await api.me();
  } catch { /* a dead session went to onSessionLost; anything else: ask again */ }
  const still = restSession();
  if (still && still.token === token) watchSessionExpiry(still, EXPIRY_RECHECK_MS);
}

/** METHOD /rest/v1/<path> (path starts with "/"), signed in unless anonymous. */
export async function rest(method, path, body = undefined, { anonymous = false } = {}) {
  const headers = {};
  const session = anonymous ? null : restSession();
  if (!anonymous) {
    if (!session) throw new ApiError(401, "not-signed-in", "you are not signed in",
      { source: "rest" });
    headers["X-Ticrypt-Session"] = session.token;
  }
  try {
    return await apiFetch(method, `/rest/v1${path}`, body, { headers, source: "rest" });
  } catch (e) {
    if (e instanceof ApiError && e.status === 401 && SESSION_DEAD.has(e.code) && !anonymous) {
      clearRestSession();
      lost.fire(e);
    }
    throw e;
  }
}

const seg = encodeURIComponent;

export const api = {
  backend: () => rest("GET", "/backend", undefined, { anonymous: true }),
  challenge: (user) => rest("POST", "/auth/challenge", { user }, { anonymous: true }),
  login: (user, challengeId, signature) => rest("POST", "/auth/login",
    { user, challenge_id: challengeId, signature }, { anonymous: true }),
  logout: () => rest("POST", "/auth/logout", {}),
  me: () => rest("GET", "/me"),
  users: async () => (await rest("GET", "/users")).users || [],
  vms: async () => (await rest("GET", "/vms")).vms || [],
  vm: (id) => rest("GET", `/vms/${seg(id)}`),
  ticket: (id) => rest("POST", `/vms/${seg(id)}/ticket`, {}),
  createPathway: async (id) => (await rest("POST", `/vms/${seg(id)}/pathways`, {})).pathway,
  pathways: async () => (await rest("GET", "/pathways")).pathways || [],
  deletePathway: (id) => rest("DELETE", `/pathways/${seg(id)}`),
  allowlist: async () => (await rest("GET", "/allowlist")).entries || [],
  addAllow: async (entry) => (await rest("POST", "/allowlist", entry)).entry,
  removeAllow: (id) => rest("DELETE", `/allowlist/${seg(id)}`),
};
