// Sans-IO secure channel, version 1 (PROTOCOL.md §4), on WebCrypto: the
// user end (the page) and the VM end (for the test vectors), as
// ticrypt/channel/channel.py.
//
//   const ch = new Channel({vmId, vmKey, privateKey, publicKey});
//   ws.send(await ch.start());                  // ClientHello (text)
//   const r = await ch.receive(message);        // string = text, bytes = binary
//   for (const m of r.send) ws.send(m);         // in order
//   r.established; r.plaintexts;                // [Uint8Array]
//   ws.send(await ch.seal(bytes));              // a record (binary)
//
// Calls are serialized: WebCrypto is asynchronous and records must be
// processed in order, so each call waits for the previous one.  Any
// ChannelError kills the channel (later calls: "closed"); the caller closes
// the websocket with 4400 and the error's code.

import { b64decode, b64encode, bytesEqual, concat, utf8 } from "./b64.js";
import { canonical, parseCanonical } from "./canon.js";
import { CHANNEL_MESSAGES, ChannelError } from "./channelerror.js";
import {
  aesGcmKey, aesGcmOpen, aesGcmSeal, ed25519Sign, ed25519Verify, hkdfSha256, hmacSha256,
  hmacSha256Verify, sha256, x25519KeyPair, x25519Shared,
} from "./primitives.js";

export { CHANNEL_MESSAGES, ChannelError };

export const VERSION = 1;
export const NONCE_SIZE = 32;
export const MAX_VM_ID_CHARS = 256;
/** Largest record plaintext. */
export const MAX_PLAINTEXT = 1048576;
/** Bytes of a record around its plaintext: version, seq, GCM tag. */
export const RECORD_OVERHEAD = 25;
/** Records per direction and channel. */
export const MAX_RECORDS = 2 ** 32;

const LABEL_USER_HELLO = utf8("ticrypt-channel-v1\x00user-hello\x00");
const LABEL_VM_HELLO = utf8("ticrypt-channel-v1\x00vm-hello\x00");
const LABEL_USER_FINISH = utf8("ticrypt-channel-v1\x00user-finish\x00");
const HKDF_INFO = utf8("ticrypt-channel-v1 keys");
const CONFIRM_VM = utf8("vm-finished");
const CONFIRM_USER = utf8("user-finished");

// Fields of each message: a decoded byte length for base64url, else a type.
const HELLO_FIELDS = { type: "string", v: "integer", role: "string", vm: "string", key: 32, eph: 32, nonce: 32, sig: 64 };
const VM_HELLO_FIELDS = { ...HELLO_FIELDS, confirm: 32 };
const FINISH_FIELDS = { type: "string", v: "integer", sig: 64, confirm: 32 };

const State = Object.freeze({
  START: "start", HELLO_SENT: "hello-sent", WAIT_HELLO: "wait-hello",
  WAIT_FINISH: "wait-finish", ESTABLISHED: "established", DEAD: "dead",
});

/** Exact key set, types, decoded lengths (base64url fields become bytes), v = 1, vm length. */
function checkFields(obj, fields) {
  const keys = Object.keys(obj);
  if (keys.length !== Object.keys(fields).length || !keys.every((k) => Object.hasOwn(fields, k))) {
    throw new ChannelError("bad-message");
  }
  const out = {};
  for (const [name, spec] of Object.entries(fields)) {
    const value = obj[name];
    if (typeof spec === "number") {
      if (typeof value !== "string") throw new ChannelError("bad-message");
      try {
        out[name] = b64decode(value, spec);
      } catch {
        throw new ChannelError("bad-message");
      }
    } else if (spec === "integer" ? !Number.isSafeInteger(value) : typeof value !== spec) {
      throw new ChannelError("bad-message");
    } else {
      out[name] = value;
    }
  }
  if (out.v !== VERSION) throw new ChannelError("bad-message");
  if ("vm" in out && !(pyLen(out.vm) > 0 && pyLen(out.vm) <= MAX_VM_ID_CHARS)) {
    throw new ChannelError("bad-message");
  }
  return out;
}

/** `obj` without the named keys. */
function strip(obj, ...names) {
  return Object.fromEntries(Object.entries(obj).filter(([k]) => !names.includes(k)));
}

/** Python's len(): code points, not UTF-16 units. */
function pyLen(s) {
  let n = 0;
  for (let i = 0; i < s.length; i++, n++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c < 0xdc00 && i + 1 < s.length && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) i++;
  }
  return n;
}

function seqBytes(seq) {
  const out = new Uint8Array(8);
  const view = new DataView(out.buffer);
  view.setUint32(0, Math.floor(seq / 2 ** 32));
  view.setUint32(4, seq >>> 0);
  return out;
}

/** Nonce (4 zero bytes || seq) and aad (0x01 || seq) of record `seq`. */
function nonceAndAad(seq) {
  const s = seqBytes(seq);
  return [concat(new Uint8Array(4), s), concat(Uint8Array.of(1), s)];
}

/** One direction's AES-GCM key and counter. */
class Direction {
  constructor(key, maxRecords) {
    this.key = key;
    this.maxRecords = maxRecords;
    this.next = 0;
  }
}

/**
 * One end of the secure channel.
 *
 * User end (the page): `{vmId, vmKey, privateKey, publicKey}`: the VM id and
 * its key as rest registered it (Uint8Array(32)); the user's Ed25519
 * CryptoKey (usage "sign", may be non-extractable) and raw public key.
 * VM end (tests): `{role: "vm", vmId, privateKey, publicKey, authorize}`,
 * `authorize(userKey: Uint8Array) -> boolean | Promise<boolean>`.
 * Optional `rng(n) -> Uint8Array` (test vectors: 32 bytes X25519 secret, then
 * 32 bytes nonce) and `maxRecords` (tests of counter-exhausted).
 */
export class Channel {
  constructor({ role = "user", vmId, vmKey, privateKey, publicKey, rng, authorize, maxRecords = MAX_RECORDS }) {
    if (role !== "user" && role !== "vm") throw new TypeError("role is 'user' or 'vm'");
    if (typeof vmId !== "string") throw new TypeError("vmId is a string");
    if (!(publicKey instanceof Uint8Array) || publicKey.length !== 32) throw new TypeError("publicKey is 32 bytes");
    if (role === "user" && (!(vmKey instanceof Uint8Array) || vmKey.length !== 32)) {
      throw new TypeError("vmKey is the VM's raw 32-byte Ed25519 key");
    }
    if (role === "vm" && typeof authorize !== "function") throw new TypeError("a VM end needs authorize");
    if (!(Number.isSafeInteger(maxRecords) && maxRecords >= 1 && maxRecords <= MAX_RECORDS)) {
      throw new RangeError("maxRecords is 1 .. 2**32");
    }
    this.role = role;
    this._vmId = vmId;
    this._vmKey = vmKey ? Uint8Array.from(vmKey) : null;
    this._privateKey = privateKey;
    this._publicKey = Uint8Array.from(publicKey);
    this._rng = rng;
    this._authorize = authorize;
    this._maxRecords = maxRecords;
    this._state = role === "user" ? State.START : State.WAIT_HELLO;
    this._tail = Promise.resolve();
    this._sealer = null;
    this._opener = null;
    /** The peer's raw Ed25519 key once known (VM end: after the hello). */
    this.peerKey = null;
  }

  /** True once records can be sealed and opened. */
  get established() {
    return this._state === State.ESTABLISHED;
  }

  /** True after an error or close(). */
  get closed() {
    return this._state === State.DEAD;
  }

  /** Forget the keys; every later call fails with ChannelError "closed". */
  close() {
    this._state = State.DEAD;
    this._sealer = this._opener = null;
    this._eph = this._vmKeys = null;
  }

  /** Run `fn` after every earlier call; a failure kills the channel. */
  _serial(fn) {
    const run = this._tail.then(async () => {
      if (this._state === State.DEAD) throw new ChannelError("closed");
      try {
        return await fn();
      } catch (e) {
        if (!(e instanceof ChannelError && e.keepsChannel)) this.close();
        throw e;
      }
    });
    this._tail = run.catch(() => {});
    return run;
  }

  _random(n) {
    const out = this._rng ? this._rng(n) : crypto.getRandomValues(new Uint8Array(n));
    if (!(out instanceof Uint8Array) || out.length !== n) throw new TypeError("rng returned the wrong number of bytes");
    return out;
  }

  /**
   * User end: the ClientHello to send first (text).
   * @returns {Promise<string>}
   */
  start() {
    return this._serial(async () => {
      if (this.role !== "user" || this._state !== State.START) throw new ChannelError("wrong-state");
      this._eph = await x25519KeyPair(this._rng ? this._random(32) : undefined);
      const body = this._helloBody("user", this._eph.publicKey, this._random(NONCE_SIZE));
      const sig = await ed25519Sign(this._privateKey, concat(LABEL_USER_HELLO, utf8(canonical(body))));
      this._helloText = canonical({ ...body, sig: b64encode(sig) });
      this._state = State.HELLO_SENT;
      return this._helloText;
    });
  }

  /**
   * Feed one websocket message: a string is a text message, a Uint8Array or
   * ArrayBuffer a binary one.
   * @param {string|Uint8Array|ArrayBuffer} message
   * @returns {Promise<{send: Array<string|Uint8Array>, established: boolean, plaintexts: Uint8Array[]}>}
   *   `send`: messages to write in order; `established`: the handshake
   *   completed with this message; `plaintexts`: delivered record contents.
   */
  receive(message) {
    return this._serial(async () => {
      const out = { send: [], established: false, plaintexts: [] };
      if (typeof message === "string") {
        if (this._state === State.ESTABLISHED) throw new ChannelError("plaintext-after-handshake");
        return this.role === "user" ? this._userText(message, out) : this._vmText(message, out);
      }
      if (message instanceof ArrayBuffer) message = new Uint8Array(message);
      if (!(message instanceof Uint8Array)) throw new TypeError("a websocket message is a string or bytes");
      if (this._state !== State.ESTABLISHED) throw new ChannelError("unexpected-message");
      out.plaintexts.push(await this._open(message));
      return out;
    });
  }

  /**
   * The record (binary message) carrying `plaintext`; only once established.
   * Over MAX_PLAINTEXT: ChannelError record-too-large, with the channel
   * still usable (nothing consumed); after maxRecords: counter-exhausted.
   * @param {Uint8Array} plaintext
   * @returns {Promise<Uint8Array>}
   */
  seal(plaintext) {
    return this._serial(async () => {
      if (this._sealer === null) throw new ChannelError("wrong-state");
      if (plaintext.length > MAX_PLAINTEXT) {
        const e = new ChannelError("record-too-large");
        e.keepsChannel = true;
        throw e;
      }
      const d = this._sealer;
      const seq = d.next;
      if (seq >= d.maxRecords) throw new ChannelError("counter-exhausted");
      const [nonce, aad] = nonceAndAad(seq);
      const record = concat(aad, await aesGcmSeal(d.key, nonce, plaintext, aad));
      d.next = seq + 1;
      return record;
    });
  }

  // -- records ---------------------------------------------------------------

  async _open(record) {
    if (record.length < RECORD_OVERHEAD || record[0] !== 1) throw new ChannelError("bad-record");
    if (record.length - RECORD_OVERHEAD > MAX_PLAINTEXT) throw new ChannelError("record-too-large");
    const d = this._opener;
    const expected = d.next;
    if (expected >= d.maxRecords) throw new ChannelError("counter-exhausted");
    const seq = new DataView(record.buffer, record.byteOffset + 1, 8).getBigUint64(0);
    if (seq < BigInt(expected)) throw new ChannelError("replay");
    if (seq > BigInt(expected)) throw new ChannelError("out-of-order");
    const [nonce, aad] = nonceAndAad(expected);
    const plaintext = await aesGcmOpen(d.key, nonce, record.subarray(9), aad);
    d.next = expected + 1;
    return plaintext;
  }

  async _establish(sendKey, receiveKey) {
    this._sealer = new Direction(await aesGcmKey(sendKey, "encrypt"), this._maxRecords);
    this._opener = new Direction(await aesGcmKey(receiveKey, "decrypt"), this._maxRecords);
    this._state = State.ESTABLISHED;
  }

  // -- handshake ---------------------------------------------------------

  _helloBody(role, eph, nonce) {
    return {
      type: "hello", v: VERSION, role, vm: this._vmId,
      key: b64encode(this._publicKey), eph: b64encode(eph), nonce: b64encode(nonce),
    };
  }

  /** The peer's hello `obj` checked: from `role`, all fields, names our VM. */
  _checkHello(obj, role, fields) {
    if ((obj.role === "user" || obj.role === "vm") && obj.role !== role) throw new ChannelError("wrong-role");
    const hello = checkFields(obj, fields);
    if (hello.role !== role) throw new ChannelError("bad-message");
    if (hello.vm !== this._vmId) throw new ChannelError("wrong-vm");
    return hello;
  }

  async _deriveKeys(shared, th1) {
    const okm = await hkdfSha256(shared, th1, HKDF_INFO, 128);
    shared.fill(0);
    return { kU2v: okm.slice(0, 32), kV2u: okm.slice(32, 64), cUser: okm.slice(64, 96), cVm: okm.slice(96, 128) };
  }

  async _userText(text, out) {
    const obj = parseCanonical(text);
    if (obj.type !== "hello" && obj.type !== "finish") throw new ChannelError("bad-message");
    if (this._state !== State.HELLO_SENT || obj.type !== "hello") throw new ChannelError("unexpected-message");
    const hello = this._checkHello(obj, "vm", VM_HELLO_FIELDS);
    if (!bytesEqual(hello.key, this._vmKey)) throw new ChannelError("vm-key-mismatch");
    const th1 = await sha256(concat(utf8(this._helloText), utf8(canonical(strip(obj, "sig", "confirm")))));
    if (!(await ed25519Verify(this._vmKey, hello.sig, concat(LABEL_VM_HELLO, th1)))) {
      throw new ChannelError("bad-signature");
    }
    const keys = await this._deriveKeys(await x25519Shared(this._eph.privateKey, hello.eph), th1);
    this._eph = null;
    if (!(await hmacSha256Verify(keys.cVm, concat(CONFIRM_VM, th1), hello.confirm))) {
      throw new ChannelError("bad-confirm");
    }
    const th2 = await sha256(concat(th1, utf8(text)));
    const finish = {
      type: "finish", v: VERSION,
      sig: b64encode(await ed25519Sign(this._privateKey, concat(LABEL_USER_FINISH, th2))),
      confirm: b64encode(await hmacSha256(keys.cUser, concat(CONFIRM_USER, th2))),
    };
    this.peerKey = this._vmKey;
    await this._establish(keys.kU2v, keys.kV2u);
    for (const k of Object.values(keys)) k.fill(0);
    out.send.push(canonical(finish));
    out.established = true;
    return out;
  }

  async _vmText(text, out) {
    const obj = parseCanonical(text);
    if (this._state === State.WAIT_HELLO && obj.type === "hello") return this._vmOnHello(text, obj, out);
    if (this._state === State.WAIT_FINISH && obj.type === "finish") return this._vmOnFinish(obj, out);
    if (obj.type === "hello" || obj.type === "finish") throw new ChannelError("unexpected-message");
    throw new ChannelError("bad-message");
  }

  async _vmOnHello(text, obj, out) {
    const hello = this._checkHello(obj, "user", HELLO_FIELDS);
    const userKey = hello.key;
    if (!(await ed25519Verify(userKey, hello.sig, concat(LABEL_USER_HELLO, utf8(canonical(strip(obj, "sig"))))))) {
      throw new ChannelError("bad-signature");
    }
    const eph = await x25519KeyPair(this._rng ? this._random(32) : undefined);
    const shared = await x25519Shared(eph.privateKey, hello.eph); // before authorize: fail cheap first
    if (!(await this._authorize(userKey))) throw new ChannelError("not-authorized");
    const body = this._helloBody("vm", eph.publicKey, this._random(NONCE_SIZE));
    const th1 = await sha256(concat(utf8(text), utf8(canonical(body))));
    const keys = await this._deriveKeys(shared, th1);
    const reply = canonical({
      ...body,
      sig: b64encode(await ed25519Sign(this._privateKey, concat(LABEL_VM_HELLO, th1))),
      confirm: b64encode(await hmacSha256(keys.cVm, concat(CONFIRM_VM, th1))),
    });
    this.peerKey = userKey;
    this._th2 = await sha256(concat(th1, utf8(reply)));
    this._vmKeys = keys;
    this._state = State.WAIT_FINISH;
    out.send.push(reply);
    return out;
  }

  async _vmOnFinish(obj, out) {
    const finish = checkFields(obj, FINISH_FIELDS);
    const keys = this._vmKeys;
    if (!(await ed25519Verify(this.peerKey, finish.sig, concat(LABEL_USER_FINISH, this._th2)))) {
      throw new ChannelError("bad-signature");
    }
    if (!(await hmacSha256Verify(keys.cUser, concat(CONFIRM_USER, this._th2), finish.confirm))) {
      throw new ChannelError("bad-confirm");
    }
    this._vmKeys = null;
    await this._establish(keys.kV2u, keys.kU2v);
    out.established = true;
    return out;
  }
}
