// connect's own API for the page (PROTOCOL.md §7 and the page sign-in):
// the page session from the #link=... fragment, client certificates and
// tunnels.  Every call carries the page token (Authorization: Bearer).
//
// An answer that is not 2xx becomes an ApiError {status, code, message};
// connect's 401 "unauthorized" means the page session is gone (connect
// restarted, or the session's time is up): the listeners of onPageLost are
// told once and the token is dropped.

import { Listeners } from "./listeners.js";

const PAGE_KEY = "ticrypt.page";
const TIMEOUT_MS = 90000; // a tunnel's "wait" covers a TCP + TLS connection

export class ApiError extends Error {
  constructor(status, code, message, { retryAfter = null, source = "connect" } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.source = source;
  }

  /** One line for people: "message (code)". */
  get human() {
    return this.code && !this.message.includes(this.code)
      ? `${this.message} (${this.code})` : this.message;
  }
}

const pageLost = new Listeners();

/** cb(reason) when connect no longer knows the page's token; the function that stops it. */
export function onPageLost(cb) {
  return pageLost.add(cb);
}

export function pageToken() {
  try {
    return sessionStorage.getItem(PAGE_KEY);
  } catch {
    return null;
  }
}

export function clearPageToken() {
  try {
    sessionStorage.removeItem(PAGE_KEY);
  } catch { /* storage off: nothing kept */ }
}

/**
 * The one-time link of the URL connect printed (#link=LINK), removed from
 * the address bar at once; null if the URL has none.
 */
export function takeLink() {
  const m = /^#link=([A-Za-z0-9_-]{1,128})$/.exec(location.hash);
  if (!m && !location.hash.startsWith("#link=")) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return m ? m[1] : "";
}

/** POST /v1/page/session {link}: a page token kept in sessionStorage. */
export async function openPageSession(link) {
  const answer = await apiFetch("POST", "/v1/page/session", { link }, { auth: false });
  if (!answer || typeof answer.token !== "string") {
    throw new ApiError(0, "bad-answer", "ticrypt-connect answered without a page token");
  }
  sessionStorage.setItem(PAGE_KEY, answer.token);
  return answer;
}

function retryAfter(response) {
  const value = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  return Number.isFinite(value) ? value : null;
}

/**
 * fetch METHOD path (same origin) with a JSON body; the parsed JSON answer,
 * null for 204.  headers: extra request headers; auth: send the page token.
 */
export async function apiFetch(method, path, body = undefined,
  { headers = {}, auth = true, source = "connect" } = {}) {
  const init = { method, headers: { ...headers }, credentials: "omit", cache: "no-store",
    redirect: "error" };
  if (auth) {
    const token = pageToken();
    if (!token) {
      throw new ApiError(401, "no-page-session", "this page is not signed in to "
        + "ticrypt-connect: open the link ticrypt-connect printed, or run: ticrypt open");
    }
    init.headers.Authorization = `Bearer ${token}`;
  }
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  init.signal = abort.signal;
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "connect-unreachable", abort.signal.aborted
      ? "ticrypt-connect did not answer in time"
      : "ticrypt-connect does not answer; is it still running?");
  } finally {
    clearTimeout(timer);
  }
  let answer = null;
  if (response.status !== 204) {
    const text = await response.text();
    try {
      answer = text ? JSON.parse(text) : null;
    } catch {
      answer = null;
    }
  }
  if (response.ok) return answer;
  const err = answer && typeof answer === "object" && answer.error;
  const code = err && typeof err.code === "string" ? err.code : `http-${response.status}`;
  const message = err && typeof err.message === "string" ? err.message
    : `HTTP ${response.status}`;
  const error = new ApiError(response.status, code, message,
    { retryAfter: retryAfter(response), source });
  if (response.status === 401 && code === "unauthorized" && auth) {
    clearPageToken();
    pageLost.fire(error);
  }
  throw error;
}

// -- certificates and tunnels (§7) ---------------------------------------------

/** POST /v1/certs -> {id, cert, fingerprint, expires} */
export function createCert() {
  return apiFetch("POST", "/v1/certs", {});
}

/** GET /v1/tunnels -> [TUNNEL, ...] */
export async function listTunnels() {
  const answer = await apiFetch("GET", "/v1/tunnels");
  return Array.isArray(answer && answer.tunnels) ? answer.tunnels : [];
}

/** POST /v1/tunnels {..., wait: true} -> TUNNEL */
export async function openTunnel(spec) {
  const answer = await apiFetch("POST", "/v1/tunnels", { ...spec, wait: true });
  return answer.tunnel;
}

/** DELETE /v1/tunnels/{id} -> TUNNEL */
export async function closeTunnel(id) {
  const answer = await apiFetch("DELETE", `/v1/tunnels/${encodeURIComponent(id)}`);
  return answer.tunnel;
}
