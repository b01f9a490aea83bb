// Key files of `ticrypt keygen` (PROTOCOL.md §2 Key files) into a
// non-extractable Ed25519 CryptoKey: PKCS#8 PEM, unencrypted or PBES2
// (PBKDF2 with HMAC-SHA1/224/256/384/512, AES-128/192/256-CBC; parameters
// taken from the file).  Only WebCrypto; the seed and the DER are wiped
// after import (best effort: JavaScript may have copied them).

import { utf8 } from "./b64.js";
import { ed25519FromSeed } from "./primitives.js";

/**
 * Why a key file cannot be used: `code` is "not-a-key", "passphrase-needed",
 * "bad-passphrase" or "unsupported"; `message` one line for the user.
 */
export class KeyFileError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "KeyFileError";
    this.code = code;
  }
}

/** PBKDF2 iteration counts above this are refused (a hostile file could hang the page). */
export const MAX_ITERATIONS = 10_000_000;

const OID = {
  ed25519: "2b6570",
  pbes2: "2a864886f70d01050d",
  pbkdf2: "2a864886f70d01050c",
};
const PRF = {
  "2a864886f70d0207": "SHA-1",
  "2a864886f70d0208": "SHA-224",
  "2a864886f70d0209": "SHA-256",
  "2a864886f70d020a": "SHA-384",
  "2a864886f70d020b": "SHA-512",
};
const AES_CBC = { "608648016503040102": 16, "608648016503040116": 24, "60864801650304012a": 32 };

class DerError extends Error {}

const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

/** A cursor over DER: read(tag) returns the next element's contents. */
class Der {
  constructor(bytes) {
    this.bytes = bytes;
    this.at = 0;
  }

  get done() {
    return this.at >= this.bytes.length;
  }

  peek() {
    return this.done ? -1 : this.bytes[this.at];
  }

  /** Contents of the next element, which must have `tag`. */
  read(tag) {
    const b = this.bytes;
    if (this.at + 2 > b.length || b[this.at] !== tag) throw new DerError("unexpected element");
    let len = b[this.at + 1];
    let at = this.at + 2;
    if (len & 0x80) {
      const n = len & 0x7f;
      if (n < 1 || n > 3 || at + n > b.length) throw new DerError("bad length");
      len = 0;
      for (let i = 0; i < n; i++) len = len * 256 + b[at + i];
      at += n;
    }
    if (at + len > b.length) throw new DerError("truncated");
    this.at = at + len;
    return b.subarray(at, at + len);
  }

  /** The next element as a nested cursor (a SEQUENCE by default). */
  sub(tag = 0x30) {
    return new Der(this.read(tag));
  }

  /** A small non-negative INTEGER. */
  int() {
    const c = this.read(0x02);
    if (c.length < 1 || c.length > 6 || c[0] & 0x80) throw new DerError("integer out of range");
    let n = 0;
    for (const x of c) n = n * 256 + x;
    return n;
  }

  oid() {
    return toHex(this.read(0x06));
  }

  end() {
    if (!this.done) throw new DerError("trailing data");
  }
}

/** The label and DER of the one PEM block in `text`. */
function pemBlock(text) {
  const m = /-----BEGIN ([A-Z0-9 ]+)-----([\s\S]*?)-----END \1-----/.exec(String(text));
  if (!m) throw new KeyFileError("not-a-key", "this is not a PEM key file (it should start with -----BEGIN PRIVATE KEY----- or -----BEGIN ENCRYPTED PRIVATE KEY-----)");
  const body = m[2].replace(/\s+/g, "");
  let der;
  try {
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(body)) throw new Error("bad base64");
    der = Uint8Array.from(atob(body), (c) => c.charCodeAt(0));
  } catch {
    throw new KeyFileError("not-a-key", "the key file's PEM block is damaged (not base64)");
  }
  return { label: m[1], der };
}

/** The 32-byte Ed25519 seed of a PKCS#8 PrivateKeyInfo (v1, or v2 with the public key). */
function seedOf(der) {
  const outer = new Der(der);
  const info = outer.sub();
  outer.end();
  const version = info.int();
  if (version > 1) throw new DerError("unknown PKCS#8 version");
  const alg = info.sub();
  if (alg.oid() !== OID.ed25519) throw new KeyFileError("unsupported", "this is not an Ed25519 key (ticrypt keys are Ed25519: ticrypt keygen)");
  alg.end();
  const inner = new Der(info.read(0x04));
  const seed = inner.read(0x04);
  inner.end();
  if (seed.length !== 32) throw new DerError("bad seed");
  while (!info.done) { // [0] attributes, [1] public key
    const tag = info.peek();
    if (tag !== 0xa0 && tag !== 0x81 && tag !== 0xa1) throw new DerError("unexpected element");
    info.read(tag);
  }
  return seed;
}

/** PBES2 parameters of an EncryptedPrivateKeyInfo, and its ciphertext. */
function pbes2Of(der) {
  const outer = new Der(der);
  const epki = outer.sub();
  outer.end();
  const alg = epki.sub();
  if (alg.oid() !== OID.pbes2) throw new KeyFileError("unsupported", "this key file's encryption is not PBES2; re-encrypt it with: openssl pkcs8 -topk8 -v2 aes-256-cbc");
  const params = alg.sub();
  const kdf = params.sub();
  if (kdf.oid() !== OID.pbkdf2) throw new KeyFileError("unsupported", "this key file's key derivation is not PBKDF2 (e.g. scrypt); re-encrypt it with: openssl pkcs8 -topk8 -v2 aes-256-cbc");
  const kp = kdf.sub();
  const salt = kp.read(0x04);
  const iterations = kp.int();
  let keyLength = null;
  let hash = "SHA-1";
  if (kp.peek() === 0x02) keyLength = kp.int();
  if (kp.peek() === 0x30) {
    const prf = kp.sub();
    hash = PRF[prf.oid()];
    if (!hash) throw new KeyFileError("unsupported", "this key file uses a PBKDF2 hash other than SHA-1/SHA-2");
    if (prf.peek() === 0x05) prf.read(0x05);
    prf.end();
  }
  kp.end();
  const enc = params.sub();
  const keyBytes = AES_CBC[enc.oid()];
  if (!keyBytes) throw new KeyFileError("unsupported", "this key file's cipher is not AES-CBC; re-encrypt it with: openssl pkcs8 -topk8 -v2 aes-256-cbc");
  const iv = enc.read(0x04);
  enc.end();
  params.end();
  const data = epki.read(0x04);
  epki.end();
  if (iv.length !== 16 || (keyLength !== null && keyLength !== keyBytes) || iterations < 1) {
    throw new DerError("bad PBES2 parameters");
  }
  if (iterations > MAX_ITERATIONS) throw new KeyFileError("unsupported", `this key file asks for ${iterations} PBKDF2 iterations (at most ${MAX_ITERATIONS})`);
  return { salt, iterations, hash, keyBytes, iv, data };
}

/** Decrypt a PBES2 EncryptedPrivateKeyInfo; the PKCS#8 DER inside. */
async function decrypt(der, passphrase) {
  let p;
  try {
    p = pbes2Of(der);
  } catch (e) {
    if (e instanceof KeyFileError) throw e;
    throw new KeyFileError("not-a-key", "the encrypted key file is damaged");
  }
  const subtle = crypto.subtle;
  let aes;
  try {
    const pass = await subtle.importKey("raw", utf8(passphrase), "PBKDF2", false, ["deriveBits"]);
    const bits = new Uint8Array(await subtle.deriveBits(
      { name: "PBKDF2", salt: p.salt, iterations: p.iterations, hash: p.hash }, pass, p.keyBytes * 8));
    try {
      aes = await subtle.importKey("raw", bits, { name: "AES-CBC" }, false, ["decrypt"]);
    } finally {
      bits.fill(0);
    }
  } catch {
    throw new KeyFileError("unsupported", `this browser cannot decrypt this key file (AES-${p.keyBytes * 8}-CBC with PBKDF2-${p.hash}); re-encrypt it with: openssl pkcs8 -topk8 -v2 aes-256-cbc`);
  }
  try {
    return new Uint8Array(await subtle.decrypt({ name: "AES-CBC", iv: p.iv }, aes, p.data));
  } catch {
    throw new KeyFileError("bad-passphrase", "wrong passphrase for this key file");
  }
}

/**
 * Import a key file as written by `ticrypt keygen`.
 * @param {string} pemText the file's text
 * @param {string} [passphrase] as typed (UTF-8, not normalised); needed only when encrypted
 * @returns {Promise<{privateKey: CryptoKey, publicKey: Uint8Array}>} a
 *   non-extractable Ed25519 key (usage "sign") and its raw 32-byte public key
 * @throws {KeyFileError}
 */
export async function importKeyFile(pemText, passphrase) {
  const { label, der } = pemBlock(pemText);
  let pkcs8;
  if (label === "PRIVATE KEY") {
    pkcs8 = der;
  } else if (label === "ENCRYPTED PRIVATE KEY") {
    if (typeof passphrase !== "string" || passphrase === "") {
      throw new KeyFileError("passphrase-needed", "this key file is protected by a passphrase; enter it");
    }
    pkcs8 = await decrypt(der, passphrase);
  } else if (/PUBLIC KEY|CERTIFICATE/.test(label)) {
    throw new KeyFileError("not-a-key", "this is a public key or certificate; choose the private key file (the one without .pub)");
  } else {
    throw new KeyFileError("unsupported", `unsupported key file (${label}); ticrypt keys are PKCS#8 Ed25519 keys from ticrypt keygen`);
  }
  let seed;
  try {
    seed = seedOf(pkcs8);
  } catch (e) {
    if (e instanceof KeyFileError) throw e;
    if (label === "ENCRYPTED PRIVATE KEY") throw new KeyFileError("bad-passphrase", "wrong passphrase for this key file");
    throw new KeyFileError("not-a-key", "the key file is damaged (not a PKCS#8 private key)");
  }
  try {
    return await ed25519FromSeed(seed, false);
  } catch {
    throw new KeyFileError("unsupported", "this browser cannot import Ed25519 keys (WebCrypto Ed25519 is needed)");
  } finally {
    seed.fill(0);
    pkcs8.fill(0);
    der.fill(0);
  }
}
