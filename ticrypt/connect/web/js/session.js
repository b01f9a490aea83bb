// A session with a VM from the page (PROTOCOL.md §5 over §4), through
// ticrypt-connect's websocket relay to the proxy's user leg (§3):
//
//   const s = await openVmSession({pageToken, ticket, vmId, vmKey, key, onProgress});
//   const info = await s.info();
//   const cmd = s.exec(["sh", "-c", "echo hi"], {onStdout: (b) => ...});
//   const status = await cmd.done;
//   const sh = s.shell({rows: 24, cols: 80}, {onOutput: (b) => term.write(b)});
//   sh.write("ls\r"); sh.resize(40, 120);
//   s.onClose(({name, human, byUs}) => ...);
//   s.close();
//
// The page is the end of the secure channel: connect and the proxy see
// only the ticket, the handshake and sealed records.  Every failure is a
// SessionError (the session ended or never started) or a RequestError (the
// VM refused one request; the session goes on).

import { b64decode, b64encode, concat, fromUtf8, utf8 } from "./b64.js";
import { MAX_JSON_DEPTH, canonical, jsonDepth } from "./canon.js";
import { Channel, ChannelError, MAX_PLAINTEXT } from "./channel.js";
import { describeClose, explainChannel, oneLine } from "./closes.js";

/** The relay's websocket subprotocol (connect answers it). */
export const SUBPROTOCOL = "ticrypt-relay-v1";
/** Longest application header (§5 Framing). */
export const MAX_HEADER = 16384;
/** Default stdin window of a request when the VM's ok names none. */
export const WINDOW = 1048576;
/** Smallest and largest stdin body per record (§5: at most 256 KiB). */
export const CHUNK = 65536;
export const MAX_BODY = 262144;
/** Longest control message from the proxy (paired) we parse. */
const MAX_CONTROL = 8192;
/** Milliseconds a cancelled command may take to report its end. */
export const CANCEL_WAIT = 15000;

/**
 * The session failed, was refused, or ended: `code` stable (a close code's
 * name, a 4400 reason, a channel error code, or "timeout",
 * "connection-lost", "relay-refused", "closed"); `human` the explanation;
 * `text` what the far end added; `closeCode` the websocket close code (null
 * if none); `message` one line for display.
 */
export class SessionError extends Error {
  constructor({ code, name, human, text = "", closeCode = null, line }) {
    super(line ?? `${name ?? code}: ${human}${text ? ` (${text})` : ""}`);
    this.code = code ?? name;
    this.name = this.code;
    this.human = human;
    this.text = text;
    this.closeCode = closeCode;
  }
}

/** The VM answered a request with an error (§5 Errors); the session goes on. */
export class RequestError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = "RequestError";
    this.code = code;
    this.detail = message;
  }
}

/** A positive safe integer (a window or credit), else null. */
function windowSize(v) {
  return Number.isSafeInteger(v) && v > 0 ? v : null;
}

/** Parse a record's plaintext `header \n body`; null if unreadable (§5). */
export function decodeApp(plaintext) {
  const nl = plaintext.indexOf(0x0a);
  if (nl < 0 || nl > MAX_HEADER) return null;
  let header;
  try {
    const text = fromUtf8(plaintext.subarray(0, nl));
    if (jsonDepth(text) > MAX_JSON_DEPTH) return null;
    header = JSON.parse(text);
  } catch {
    return null;
  }
  if (header === null || typeof header !== "object" || Array.isArray(header) || typeof header.t !== "string") return null;
  if ("id" in header && !(Number.isSafeInteger(header.id) && header.id >= 0)) return null;
  return { header, body: plaintext.subarray(nl + 1) };
}

/** One record's plaintext for `header` and `body`; RangeError over the record limit. */
export function encodeApp(header, body = new Uint8Array(0)) {
  const out = concat(utf8(canonical(header)), Uint8Array.of(0x0a), body);
  if (out.length > MAX_PLAINTEXT) throw new RangeError("application message too large for one record");
  return out;
}

/** The raw 32 bytes of a VM key given as bytes, "ed25519:<b64>" or bare b64. */
function rawKey(key) {
  if (key instanceof Uint8Array) return key;
  const text = String(key).trim();
  return b64decode(text.startsWith("ed25519:") ? text.slice(8) : text, 32);
}

/** A running exec or shell (§5 Streams, Flow control). */
class Command {
  constructor(session, rid, kind, onStdout, onStderr) {
    this._session = session;
    this.rid = rid;
    this.kind = kind;
    this._onStdout = onStdout;
    this._onStderr = onStderr;
    this.finished = false;
    /** The VM's ok came: the request runs until its exit. */
    this.accepted = false;
    /** stdin bytes sent so far. */
    this.sent = 0;
    this._credit = 0;
    this._record = CHUNK;
    this._queue = []; // Uint8Array, or null for an eof
    this._queued = 0;
    this._eof = false;
    this._cancelled = false;
    this._cancelTimer = null;
    /** Resolves with the exit status; rejects with RequestError or SessionError. */
    this.done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.done.catch(() => {}); // the caller may only care about output
  }

  /** stdin bytes written but not sent yet (waiting for window). */
  get pending() {
    return this._queued;
  }

  /**
   * Send stdin (a string is UTF-8 encoded); queued while the window is exhausted.
   * @param {Uint8Array|string} data
   */
  write(data) {
    if (typeof data === "string") data = utf8(data);
    if (this.finished || this._eof || !data.length) return;
    this._queue.push(Uint8Array.from(data));
    this._queued += data.length;
    this._flush();
  }

  /** exec: end of input (once); shell: the terminal's ^D (uses 1 byte of window). */
  eof() {
    if (this.finished || this._eof) return;
    this._eof = this.kind === "exec";
    this._queue.push(null);
    this._flush();
  }

  /** shell: the terminal's new size. */
  resize(rows, cols) {
    if (!this.finished && this.kind === "shell") {
      this._session._send({ t: "resize", id: this.rid, rows, cols });
    }
  }

  /**
   * Ask the VM to end the command (SIGTERM, then SIGKILL after its grace);
   * `done` gets the status it reports.  If none comes within `wait` ms, or
   * on a second call, stop waiting: `done` rejects with code "cancelled".
   */
  cancel(wait = CANCEL_WAIT) {
    if (this.finished) return;
    if (this._cancelled) {
      this._finish(null, new RequestError("cancelled", "stopped waiting for the VM to end the command"));
      return;
    }
    this._cancelled = true;
    this._session._send({ t: "cancel", id: this.rid });
    this._cancelTimer = setTimeout(() => this._finish(null, new RequestError("cancelled",
      `the VM did not report the end of the command within ${wait / 1000}s; it may still be running`)), wait);
  }

  _flush() {
    while (this._queue.length && !this.finished) {
      const item = this._queue[0];
      if (item === null) {
        if (this.kind === "shell") {
          if (this._credit < 1) break;
          this._credit -= 1;
        }
        this._queue.shift();
        this._session._send({ t: "eof", id: this.rid });
        continue;
      }
      const n = Math.min(item.length, this._credit, this._record);
      if (n === 0) break;
      if (n === item.length) this._queue.shift();
      else this._queue[0] = item.subarray(n);
      this._credit -= n;
      this._queued -= n;
      this.sent += n;
      this._session._send({ t: "stdin", id: this.rid }, item.subarray(0, n));
    }
  }

  _deliver(header, body) {
    switch (header.t) {
      case "stdout":
        if (this._onStdout) this._onStdout(body);
        break;
      case "stderr":
        if (this._onStderr) this._onStderr(body);
        break;
      case "window":
        this._credit += windowSize(header.bytes) ?? 0;
        this._flush();
        break;
      case "ok":
        if (this.accepted) break;
        this.accepted = true;
        this._credit = windowSize(header.window) ?? WINDOW;
        // records of a quarter of the window (64 KiB .. 256 KiB): up to four in flight
        this._record = Math.min(MAX_BODY, Math.max(CHUNK, Math.floor(this._credit / 4)));
        this._flush();
        break;
      case "exit":
        this._finish(Number.isSafeInteger(header.status) ? header.status : 255, null);
        break;
      case "error": {
        const err = new RequestError(oneLine(header.code ?? "error", 64), oneLine(header.message ?? ""));
        if (!this.accepted) this._finish(null, err); // it answers the req
        else console.warn(`the VM refused a message of request ${this.rid}: ${err.message}`);
        break;
      }
      default:
        break;
    }
  }

  _finish(status, err) {
    if (this.finished) return;
    this.finished = true;
    clearTimeout(this._cancelTimer);
    this._queue = [];
    this._queued = 0;
    this._session._requests.delete(this.rid);
    if (err) this._reject(err);
    else this._resolve(status);
  }
}

/** A request waiting for its ok/error. */
class Pending {
  constructor(op, timeoutMs, session, rid) {
    this.promise = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this._timer = setTimeout(() => this._finish(null,
      new RequestError("timeout", `the VM did not answer ${op} within ${timeoutMs / 1000}s`)), timeoutMs);
    this._session = session;
    this._rid = rid;
  }

  _deliver(header) {
    if (header.t === "ok") this._finish(header, null);
    else if (header.t === "error") {
      this._finish(null, new RequestError(oneLine(header.code ?? "error", 64), oneLine(header.message ?? "")));
    }
  }

  _finish(value, err) {
    clearTimeout(this._timer);
    this._session._requests.delete(this._rid);
    if (err) this._reject(err);
    else this._resolve(value);
  }
}

/**
 * An established secure channel to one VM; requests multiplex over it (§5).
 * Made by openVmSession.
 */
export class VmSession {
  constructor(link, { requestTimeout }) {
    this._link = link;
    this._requestTimeout = requestTimeout;
    this._nextId = 1;
    this._requests = new Map();
    /** The VM's key as verified in the handshake. */
    this.vmKey = link.channel.peerKey;
  }

  /** Neither failed nor closed. */
  get isOpen() {
    return this._link.ended === null;
  }

  _check() {
    if (this._link.ended) throw this._link.ended;
  }

  _rid() {
    return this._nextId++;
  }

  _send(header, body) {
    this._link.sendApp(encodeApp(header, body));
  }

  /**
   * One request and its answer (info, users, authorize, revoke, tunnel-accept).
   * @param {string} op
   * @param {Object} [fields]
   * @returns {Promise<Object>} the ok header
   */
  async request(op, fields = {}) {
    this._check();
    const rid = this._rid();
    const message = encodeApp({ ...fields, t: "req", id: rid, op });
    const pending = new Pending(op, this._requestTimeout, this, rid);
    this._requests.set(rid, pending);
    this._link.sendApp(message);
    return pending.promise;
  }

  /** {vm, hostname, owner, version, tls_fingerprint, owner_user}. */
  info() {
    return this.request("info");
  }

  /** {owner: {name, key}, users: [{name, key}]} (owner only). */
  users() {
    return this.request("users");
  }

  /** Authorize `key` ("ed25519:..." or raw bytes) as `name` (owner only). */
  authorize(key, name) {
    const text = key instanceof Uint8Array ? `ed25519:${b64encode(key)}` : String(key);
    return this.request("authorize", { key: text, name });
  }

  /**
   * Revoke a user by key or name (owner only): `{key}`, `{name}`, or a
   * string ("ed25519:..." is a key, anything else a name).
   */
  revoke(who) {
    if (typeof who === "string") who = who.startsWith("ed25519:") ? { key: who } : { name: who };
    if (who.key instanceof Uint8Array) who = { key: `ed25519:${b64encode(who.key)}` };
    return this.request("revoke", who.key !== undefined ? { key: who.key } : { name: who.name });
  }

  /** Pin a client certificate (PEM) for the tunnel; {ports, tls_fingerprint, pin_expires, ...}. */
  tunnelAccept(certPem) {
    return this.request("tunnel-accept", { cert: certPem });
  }

  /**
   * Run `argv`; output to the callbacks.  The handle: `done` (exit status),
   * `write(bytes|string)`, `eof()`, `cancel()`, `pending`.
   * @param {string[]} argv
   * @param {{onStdout?: function(Uint8Array), onStderr?: function(Uint8Array), stdin?: Uint8Array|string}} [io]
   *   with `stdin`, it is written and followed by eof
   */
  exec(argv, { onStdout, onStderr, stdin } = {}) {
    this._check();
    const rid = this._rid();
    const message = encodeApp({ t: "req", id: rid, op: "exec", argv: Array.from(argv) });
    const cmd = new Command(this, rid, "exec", onStdout, onStderr);
    this._requests.set(rid, cmd);
    this._link.sendApp(message);
    if (stdin !== undefined) {
      cmd.write(stdin);
      cmd.eof();
    }
    return cmd;
  }

  /**
   * A shell on a terminal of `rows` x `cols`; stdout and stderr (merged by
   * the PTY) to `onOutput`.  The handle: `done`, `write`, `resize(rows,
   * cols)`, `eof()` (^D), `cancel()`.
   */
  shell({ rows = 24, cols = 80, term = "xterm-256color" } = {}, { onOutput } = {}) {
    this._check();
    const rid = this._rid();
    const message = encodeApp({ t: "req", id: rid, op: "shell", term, rows, cols });
    const cmd = new Command(this, rid, "shell", onOutput, onOutput);
    this._requests.set(rid, cmd);
    this._link.sendApp(message);
    return cmd;
  }

  /**
   * End the session (close 1000 "bye").
   * @returns {Promise<void>} when the socket is closed
   */
  close() {
    return this._link.close(1000, "bye");
  }

  /**
   * cb({code, name, text, human, line, byUs}) once when the channel or the
   * socket ends (at once, asynchronously, if it already has).
   */
  onClose(cb) {
    this._link.onClose(cb);
  }

  _app(header, body) {
    const target = Number.isSafeInteger(header.id) ? this._requests.get(header.id) : undefined;
    if (target) target._deliver(header, body);
    else if (header.t === "error") console.warn(`the VM reported ${oneLine(header.code, 64)}`);
  }

  _ended(err) {
    for (const target of Array.from(this._requests.values())) target._finish(null, err);
    this._requests.clear();
  }
}

/** The websocket, the proxy's user leg and the channel under a VmSession. */
class Link {
  constructor(ws, channel, onFail) {
    this.ws = ws;
    this.channel = channel;
    this.phase = "connecting"; // connect-sent, handshake, established, closed
    this.ended = null; // the SessionError the session ends with
    this.closing = false;
    this.opened = false;
    this.byUs = false;
    this.session = null;
    this._onFail = onFail;
    this._closeCallbacks = [];
    this._closeInfo = null;
    this._closed = new Promise((resolve) => { this._closedResolve = resolve; });
  }

  sendApp(plaintext) {
    if (this.ended || this.closing) return;
    this.channel.seal(plaintext).then(
      (record) => { if (!this.closing && this.ws.readyState === WebSocket.OPEN) this.ws.send(record); },
      (e) => this.channelFailed(e));
  }

  /** This end's channel failed: close 4400 <code>. */
  channelFailed(e) {
    if (!(e instanceof ChannelError)) {
      console.error("secure channel: unexpected failure", e);
      e = new ChannelError("closed");
    }
    this.fail(new SessionError({ code: e.code, human: explainChannel(e.code), closeCode: 4400 }), 4400, e.code);
  }

  /** End with `err`, closing with `code` and `reason`. */
  fail(err, code, reason) {
    if (this.closing || this.phase === "closed") return;
    this.ended = err;
    this.close(code, reason);
  }

  close(code, reason) {
    if (!this.closing && this.phase !== "closed") {
      this.closing = true;
      this.byUs = true;
      this._sentClose = { code, reason };
      this.ws.close(code, cutReason(reason));
    }
    return this._closed;
  }

  onClose(cb) {
    if (this._closeInfo) queueMicrotask(() => cb(this._closeInfo));
    else this._closeCallbacks.push(cb);
  }

  /** The socket closed: settle the session and tell the onClose callbacks. */
  closed(ev) {
    const established = this.phase === "established";
    this.phase = "closed";
    this.channel.close();
    // our own close: what we said (the echo may carry no reason)
    const far = this.byUs ? describeClose(this._sentClose.code, this._sentClose.reason) : describeClose(ev.code, ev.reason);
    let err = this.ended; // a failure found here wins over the far end's code
    if (!err) {
      if (!this.opened && (ev.code === 1006 || ev.code === 1005)) {
        err = new SessionError({ code: "relay-refused", closeCode: ev.code,
          human: "ticrypt-connect refused or could not open the connection: the page's sign-in may have ended (open the link again or run 'ticrypt open'), or connect is not running" });
      } else if (!(established && ev.code === 1000)) {
        err = new SessionError({ code: far.name, human: far.human, text: far.text, closeCode: ev.code, line: far.line });
      }
    }
    const byUs = !!this.byUs;
    const info = err
      ? { code: ev.code, name: err.code, text: err.text, human: err.human, line: err.message, byUs }
      : { ...far, byUs };
    this.ended = err ?? new SessionError({ code: "closed", human: "the session is closed", closeCode: ev.code });
    this._closeInfo = info;
    if (this.session) this.session._ended(this.ended);
    else this._onFail(this.ended);
    for (const cb of this._closeCallbacks.splice(0)) {
      try {
        cb(info);
      } catch (e) {
        console.error("onClose callback failed", e);
      }
    }
    this._closedResolve();
  }
}

/** A close reason cut to the 123 bytes of UTF-8 a close frame carries. */
function cutReason(reason) {
  let out = String(reason ?? "");
  while (utf8(out).length > 123) out = Array.from(out).slice(0, -1).join("");
  return out;
}

/** The relay's URL on this page's origin. */
function relayUrl() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/relay/v1/user`;
}

/**
 * Open a session with a VM through connect's relay: present the ticket,
 * wait for the proxy's `paired`, run the secure channel's handshake.
 * @param {Object} o
 * @param {string} o.pageToken the page's token at connect
 * @param {string} o.ticket the connection ticket from rest
 * @param {string} o.vmId
 * @param {Uint8Array|string} o.vmKey the VM's key as rest registered it
 * @param {{privateKey: CryptoKey, publicKey: Uint8Array}} o.key the user's key
 * @param {function(string)} [o.onProgress] "connecting", "waiting-for-vm", "handshake", "ready"
 * @param {string} [o.url] the relay (default: /relay/v1/user on this origin)
 * @param {number} [o.timeout] ms for the whole set-up (default 30000)
 * @param {number} [o.requestTimeout] ms per request/answer (default 60000)
 * @returns {Promise<VmSession>} rejects with SessionError
 */
export function openVmSession({ pageToken, ticket, vmId, vmKey, key, onProgress = () => {}, url, timeout = 30000, requestTimeout = 60000 }) {
  return new Promise((resolve, reject) => {
    const progress = (stage) => {
      try {
        onProgress(stage);
      } catch (e) {
        console.error("onProgress failed", e);
      }
    };
    let channel;
    try {
      channel = new Channel({ vmId, vmKey: rawKey(vmKey), privateKey: key.privateKey, publicKey: key.publicKey });
    } catch (e) {
      reject(new SessionError({ code: "bad-request", human: `cannot open a channel: ${e.message}` }));
      return;
    }
    progress("connecting");
    const ws = new WebSocket(url ?? relayUrl(), [SUBPROTOCOL, `bearer.${pageToken}`]);
    ws.binaryType = "arraybuffer";
    const link = new Link(ws, channel, reject);
    const timer = setTimeout(() => {
      if (link.phase !== "established") {
        const seconds = timeout / 1000;
        link.fail(new SessionError({ code: "timeout", human: `no secure channel within ${seconds}s`, closeCode: 4008 }),
          4008, `timeout: no secure channel within ${seconds}s`);
      }
    }, timeout);

    const badProxyMessage = () => link.fail(
      new SessionError({ code: "bad-message", human: "unexpected message from the proxy", closeCode: 4000 }),
      4000, "bad-message: expected paired");

    ws.onopen = () => {
      link.opened = true;
      if (link.closing) return;
      if (ws.protocol !== SUBPROTOCOL) {
        link.fail(new SessionError({ code: "bad-message", human: "ticrypt-connect did not accept the relay protocol", closeCode: 4000 }),
          4000, "bad-message: relay subprotocol missing");
        return;
      }
      ws.send(JSON.stringify({ type: "connect", ticket }));
      link.phase = "connect-sent";
      progress("waiting-for-vm");
    };

    ws.onmessage = (ev) => {
      if (link.closing || link.phase === "closed") return;
      const data = typeof ev.data === "string" ? ev.data : new Uint8Array(ev.data);
      if (link.phase === "connect-sent") {
        let msg = null;
        try {
          if (typeof data === "string" && data.length <= MAX_CONTROL) msg = JSON.parse(data);
        } catch {
          msg = null;
        }
        if (msg === null || typeof msg !== "object" || msg.type !== "paired") {
          badProxyMessage();
          return;
        }
        link.phase = "handshake";
        progress("handshake");
        channel.start().then((hello) => { if (!link.closing) ws.send(hello); }, (e) => link.channelFailed(e));
        return;
      }
      if (link.phase !== "handshake" && link.phase !== "established") return;
      channel.receive(data).then((out) => {
        if (link.closing) return;
        for (const m of out.send) ws.send(m);
        if (out.established) {
          link.phase = "established";
          clearTimeout(timer);
          link.session = new VmSession(link, { requestTimeout });
          progress("ready");
          resolve(link.session);
        }
        for (const plaintext of out.plaintexts) {
          const msg = decodeApp(plaintext);
          if (msg === null) {
            console.warn("skipped an unreadable message from the VM");
            continue;
          }
          try {
            if (link.session) link.session._app(msg.header, msg.body);
          } catch (e) { // a page callback failed: the session goes on
            console.error("a session callback failed", e);
          }
        }
      }, (e) => link.channelFailed(e));
    };

    ws.onclose = (ev) => {
      clearTimeout(timer);
      link.closed(ev);
    };
  });
}
