// Domain-separated Ed25519 signatures (PROTOCOL.md §2 Signatures), as
// ticrypt/signed.py: every signature is over
//   "ticrypt-signed-v1" 0x00 purpose 0x00 canonical(payload)
// so one made for a purpose (login-v1, ...) is worthless for another.

import { b64encode, concat, utf8 } from "./b64.js";
import { canonical } from "./canon.js";
import { ed25519Sign } from "./primitives.js";

const DOMAIN = utf8("ticrypt-signed-v1\x00");

/**
 * The bytes signed for `payload` under `purpose`.
 * @param {string} purpose ASCII, e.g. "login-v1"
 * @param {Object} payload canonical-JSON-able object
 * @returns {Uint8Array}
 */
export function signingInput(purpose, payload) {
  if (typeof purpose !== "string" || !/^[\x21-\x7e]+$/.test(purpose)) throw new TypeError("purpose is printable ASCII");
  return concat(DOMAIN, utf8(purpose), Uint8Array.of(0), utf8(canonical(payload)));
}

/**
 * Sign `payload` for `purpose` with the user's key.
 * @param {CryptoKey} privateKey Ed25519, usage "sign" (may be non-extractable)
 * @param {string} purpose
 * @param {Object} payload
 * @returns {Promise<string>} b64 of the 64-byte signature
 */
export async function signPurpose(privateKey, purpose, payload) {
  return b64encode(await ed25519Sign(privateKey, signingInput(purpose, payload)));
}
