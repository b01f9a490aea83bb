// One VM's secure session for the VM page: opened when a panel first needs
// it (ticket from rest, then the channel through connect's relay), shared
// by the terminal, exec, users and tunnel panels, opened again on demand
// after it ended.  Listeners hear every state change:
//   {state: "idle"|"opening"|"open"|"closed"|"failed", text, code}

import { b64decode } from "./b64.js";
import { pageToken } from "./connectapi.js";
import { Listeners } from "./listeners.js";
import { api } from "./rest.js";

export const STAGES = {
  ticket: "Getting a connection ticket from rest…",
  connecting: "Connecting to the proxy through ticrypt-connect…",
  "waiting-for-vm": "Waiting for the VM to answer…",
  handshake: "Secure channel handshake with the VM…",
  ready: "Secure channel established",
};

/** The stable code of an error from rest, connect, the channel or the VM. */
export function errorCode(e) {
  if (e && typeof e.code === "string" && e.code) return e.code;
  if (e && typeof e.name === "string" && /^[a-z0-9]+(-[a-z0-9]+)*$/.test(e.name)) return e.name;
  return "error";
}

/** One human line for an error from rest, connect, the channel or the VM. */
export function errorText(e) {
  if (!e) return "unknown error";
  if (typeof e.human === "string" && e.human) return e.human;
  if (e.source === "rest" || e.source === "connect") return e.message;
  const code = errorCode(e);
  return e.message && code !== "error" && !e.message.startsWith(code)
    ? `${code}: ${e.message}` : (e.message || String(e));
}

export function vmKeyBytes(text) {
  if (typeof text !== "string" || !text.startsWith("ed25519:")) {
    throw Object.assign(new Error("rest sent no usable VM key (is the VM enrolled?)"),
      { code: "vm-not-enrolled" });
  }
  return b64decode(text.slice("ed25519:".length), 32);
}

export class VmConn {
  constructor(ctx, vmId) {
    this.ctx = ctx;
    this.vmId = vmId;
    this.current = null;   // the open VmSession
    this.opening = null;   // Promise<VmSession> while opening
    this.info = null;      // the VM's answer to "info"
    this.state = { state: "idle", text: "Not connected yet", code: null };
    this.listeners = new Listeners();
    this.disposed = false;
  }

  listen(cb) {
    const stop = this.listeners.add(cb);
    cb(this.state);
    return stop;
  }

  _set(state, text, code = null) {
    this.state = { state, text, code };
    this.listeners.fire(this.state);
  }

  get isOpen() {
    return this.current !== null;
  }

  /** The open session, opening one if needed (rejects with the failure). */
  session() {
    if (this.current) return Promise.resolve(this.current);
    if (!this.opening) {
      this.opening = this._open().finally(() => { this.opening = null; });
    }
    return this.opening;
  }

  async _open() {
    this._set("opening", STAGES.ticket);
    let session;
    try {
      const t = await api.ticket(this.vmId);
      const { openVmSession } = await import("./session.js");
      session = await openVmSession({
        pageToken: pageToken(), ticket: t.ticket, vmId: this.vmId,
        vmKey: vmKeyBytes(t.vm_public_key),
        key: { privateKey: this.ctx.key.privateKey, publicKey: this.ctx.key.publicKey },
        onProgress: (stage) => {
          if (!this.disposed && stage !== "ready") this._set("opening", STAGES[stage] || stage);
        },
      });
    } catch (e) {
      this._set("failed", errorText(e), errorCode(e));
      throw e;
    }
    if (this.disposed) {
      session.close();
      throw Object.assign(new Error("the page left this VM"), { code: "closed" });
    }
    this.current = session;
    session.onClose((info) => {
      if (this.current === session) this.current = null;
      if (this.disposed) return;
      if (info.byUs) this._set("closed", "Session closed", info.name || "normal");
      else this._set("failed", info.human || `closed (${info.code})`, info.name || null);
    });
    this._set("open", STAGES.ready);
    try {
      this.info = await session.info();
      if (this.current === session) this._set("open", STAGES.ready);
    } catch { /* info is a courtesy */ }
    return session;
  }

  close() {
    this.disposed = true;
    const s = this.current;
    this.current = null;
    if (s) s.close();
  }
}
