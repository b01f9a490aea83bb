// The cryptographic primitives of the secure channel (PROTOCOL.md §4), on
// WebCrypto only, with the policy of ticrypt/channel/primitives.py:
//
// * Ed25519 verification is strict: S < L, and public keys of small order
//   (any encoding of the 8 torsion points) are refused before WebCrypto sees
//   them (Chromium's Ed25519 accepts them, as plain cofactorless
//   verification does).
// * X25519 accepts any 32-byte value except one giving an all-zero shared
//   secret (WebCrypto refusing a low-order input counts the same):
//   ChannelError low-order-point.

import { ChannelError } from "./channelerror.js";
import { b64decode, concat } from "./b64.js";

const subtle = globalThis.crypto.subtle;

/** DER of a PKCS#8 PrivateKeyInfo for Ed25519 / X25519 before the 32-byte seed (RFC 8410). */
export const ED25519_PKCS8_PREFIX = Uint8Array.from([
  0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20]);
const X25519_PKCS8_PREFIX = Uint8Array.from([
  0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x04, 0x22, 0x04, 0x20]);

// edwards25519 (RFC 8032 §5.1), only to spot small-order keys; L for S < L.
const P = 2n ** 255n - 19n;
const L = 2n ** 252n + 27742317777372353535851937790883648493n;
const mod = (a) => ((a % P) + P) % P;
function modpow(base, exp) {
  let result = 1n;
  base = mod(base);
  while (exp > 0n) {
    if (exp & 1n) result = (result * base) % P;
    base = (base * base) % P;
    exp >>= 1n;
  }
  return result;
}
const inv = (a) => modpow(a, P - 2n);
const D = mod(-121665n * inv(121666n));
const SQRT_M1 = modpow(2n, (P - 1n) / 4n);

/** Little-endian unsigned integer of `bytes`. */
function leInt(bytes) {
  let n = 0n;
  for (let i = bytes.length - 1; i >= 0; i--) n = (n << 8n) | BigInt(bytes[i]);
  return n;
}

/**
 * Whether the 32-byte Ed25519 public key decodes to a point of small order
 * ([8]P = identity); non-canonical encodings count as the point they alias.
 * @param {Uint8Array} pub
 * @returns {boolean}
 */
export function ed25519SmallOrder(pub) {
  let y = mod(leInt(pub) & ((1n << 255n) - 1n));
  const sign = BigInt(pub[31] >> 7);
  const x2 = mod((y * y - 1n) * inv(D * y * y + 1n));
  let x = modpow(x2, (P + 3n) / 8n);
  if (mod(x * x - x2) !== 0n) x = (x * SQRT_M1) % P;
  if (mod(x * x - x2) !== 0n) return false; // not on the curve: refused anyway
  if ((x & 1n) !== sign) x = mod(P - x);
  for (let i = 0; i < 3; i++) { // complete twisted Edwards doubling, a = -1
    const xx = (x * x) % P;
    const yy = (y * y) % P;
    const t = (D * xx * yy) % P;
    [x, y] = [mod(2n * x * y * inv(1n + t)), mod((yy + xx) * inv(1n - t))];
  }
  return x === 0n && y === 1n;
}

/**
 * Strict Ed25519 verification; never throws for bad input (false instead).
 * @param {Uint8Array} pub raw 32-byte public key
 * @param {Uint8Array} sig 64-byte signature
 * @param {Uint8Array} message
 * @returns {Promise<boolean>}
 */
export async function ed25519Verify(pub, sig, message) {
  if (pub.length !== 32 || sig.length !== 64) return false;
  if (ed25519SmallOrder(pub)) return false;
  if (leInt(sig.subarray(32)) >= L) return false;
  try {
    const key = await subtle.importKey("raw", pub, { name: "Ed25519" }, false, ["verify"]);
    return await subtle.verify({ name: "Ed25519" }, key, sig, message);
  } catch {
    return false;
  }
}

/**
 * An Ed25519 signature (deterministic, 64 bytes).
 * @param {CryptoKey} privateKey
 * @param {Uint8Array} message
 * @returns {Promise<Uint8Array>}
 */
export async function ed25519Sign(privateKey, message) {
  return new Uint8Array(await subtle.sign({ name: "Ed25519" }, privateKey, message));
}

/**
 * The raw public key of an extractable Ed25519 or X25519 private CryptoKey.
 * @param {CryptoKey} privateKey
 * @returns {Promise<Uint8Array>}
 */
export async function publicOfPrivate(privateKey) {
  const jwk = await subtle.exportKey("jwk", privateKey);
  return b64decode(jwk.x, 32);
}

/**
 * Ed25519 keys from an RFC 8032 32-byte seed (test vectors, key files).
 * @param {Uint8Array} seed
 * @param {boolean} [extractable] of the returned private key
 * @returns {Promise<{privateKey: CryptoKey, publicKey: Uint8Array}>}
 */
export async function ed25519FromSeed(seed, extractable = false) {
  if (seed.length !== 32) throw new TypeError("an Ed25519 seed is 32 bytes");
  const der = concat(ED25519_PKCS8_PREFIX, seed);
  try {
    const probe = await subtle.importKey("pkcs8", der, { name: "Ed25519" }, true, ["sign"]);
    const publicKey = await publicOfPrivate(probe);
    const privateKey = extractable ? probe
      : await subtle.importKey("pkcs8", der, { name: "Ed25519" }, false, ["sign"]);
    return { privateKey, publicKey };
  } finally {
    der.fill(0);
  }
}

/**
 * A fresh X25519 key pair: from `secret` (32 bytes, clamped by X25519 as
 * RFC 7748 says; test vectors) or generated (non-extractable).
 * @param {Uint8Array} [secret]
 * @returns {Promise<{privateKey: CryptoKey, publicKey: Uint8Array}>}
 */
export async function x25519KeyPair(secret) {
  if (secret === undefined) {
    const pair = await subtle.generateKey({ name: "X25519" }, false, ["deriveBits"]);
    return { privateKey: pair.privateKey, publicKey: new Uint8Array(await subtle.exportKey("raw", pair.publicKey)) };
  }
  const der = concat(X25519_PKCS8_PREFIX, secret);
  try {
    const privateKey = await subtle.importKey("pkcs8", der, { name: "X25519" }, true, ["deriveBits"]);
    return { privateKey, publicKey: await publicOfPrivate(privateKey) };
  } finally {
    der.fill(0);
  }
}

/**
 * X25519(private, peer); ChannelError low-order-point when the result is all
 * zero or WebCrypto refuses the peer's value.
 * @param {CryptoKey} privateKey
 * @param {Uint8Array} peer 32 bytes
 * @returns {Promise<Uint8Array>}
 */
export async function x25519Shared(privateKey, peer) {
  let shared;
  try {
    const pub = await subtle.importKey("raw", peer, { name: "X25519" }, true, []);
    shared = new Uint8Array(await subtle.deriveBits({ name: "X25519", public: pub }, privateKey, 256));
  } catch {
    throw new ChannelError("low-order-point");
  }
  if (shared.every((b) => b === 0)) throw new ChannelError("low-order-point");
  return shared;
}

/**
 * SHA-256 digest.
 * @param {Uint8Array} data
 * @returns {Promise<Uint8Array>}
 */
export async function sha256(data) {
  return new Uint8Array(await subtle.digest("SHA-256", data));
}

/**
 * HKDF-SHA256 (RFC 5869).
 * @param {Uint8Array} ikm
 * @param {Uint8Array} salt
 * @param {Uint8Array} info
 * @param {number} length bytes
 * @returns {Promise<Uint8Array>}
 */
export async function hkdfSha256(ikm, salt, info, length) {
  const key = await subtle.importKey("raw", ikm, "HKDF", false, ["deriveBits"]);
  return new Uint8Array(await subtle.deriveBits({ name: "HKDF", hash: "SHA-256", salt, info }, key, length * 8));
}

async function hmacKey(key, usage) {
  return subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, [usage]);
}

/**
 * HMAC-SHA256 tag.
 * @param {Uint8Array} key
 * @param {Uint8Array} message
 * @returns {Promise<Uint8Array>}
 */
export async function hmacSha256(key, message) {
  return new Uint8Array(await subtle.sign("HMAC", await hmacKey(key, "sign"), message));
}

/**
 * Whether `tag` is HMAC-SHA256(key, message); WebCrypto's verify compares
 * in constant time.
 * @param {Uint8Array} key
 * @param {Uint8Array} message
 * @param {Uint8Array} tag
 * @returns {Promise<boolean>}
 */
export async function hmacSha256Verify(key, message, tag) {
  if (tag.length !== 32) return false;
  return subtle.verify("HMAC", await hmacKey(key, "verify"), tag, message);
}

/**
 * A non-extractable AES-256-GCM key for one direction.
 * @param {Uint8Array} raw 32 bytes
 * @param {"encrypt"|"decrypt"} usage
 * @returns {Promise<CryptoKey>}
 */
export async function aesGcmKey(raw, usage) {
  return subtle.importKey("raw", raw, { name: "AES-GCM" }, false, [usage]);
}

/**
 * AES-256-GCM encryption: ciphertext || 16-byte tag.
 * @returns {Promise<Uint8Array>}
 */
export async function aesGcmSeal(key, nonce, plaintext, aad) {
  return new Uint8Array(await subtle.encrypt({ name: "AES-GCM", iv: nonce, additionalData: aad, tagLength: 128 }, key, plaintext));
}

/**
 * AES-256-GCM decryption of ciphertext || tag; ChannelError decrypt-failed.
 * @returns {Promise<Uint8Array>}
 */
export async function aesGcmOpen(key, nonce, ciphertext, aad) {
  try {
    return new Uint8Array(await subtle.decrypt({ name: "AES-GCM", iv: nonce, additionalData: aad, tagLength: 128 }, key, ciphertext));
  } catch {
    throw new ChannelError("decrypt-failed");
  }
}
