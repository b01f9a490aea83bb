// The one error of the secure channel (PROTOCOL.md §4 Errors), with the
// same stable codes and fixed human messages as ticrypt/channel/errors.py.

/** Every code a ChannelError can carry, with its fixed human message. */
export const CHANNEL_MESSAGES = Object.freeze({
  "bad-message": "malformed handshake message",
  "wrong-role": "handshake message from the wrong role (reflected?)",
  "wrong-vm": "handshake is for a different VM",
  "vm-key-mismatch": "the VM presented a key other than the one registered for it",
  "bad-signature": "handshake signature does not verify",
  "bad-confirm": "handshake key confirmation does not match",
  "not-authorized": "this user is not authorized on this VM",
  "low-order-point": "peer ephemeral key is a low-order point",
  "unexpected-message": "message not expected in this state of the channel",
  "plaintext-after-handshake": "text message received after the handshake",
  "bad-record": "malformed record",
  "record-too-large": "record exceeds the maximum plaintext size",
  "replay": "record sequence number already used (replay)",
  "out-of-order": "record sequence number skips ahead (reordered or dropped record)",
  "decrypt-failed": "record failed authentication",
  "counter-exhausted": "record counter exhausted; open a new channel",
  "wrong-state": "operation not allowed in this state of the channel",
  "closed": "channel is closed after an earlier error",
});

/**
 * A handshake or record failure; the channel that threw it is dead (except
 * record-too-large from seal(), which consumes nothing).
 * `code` is a key of CHANNEL_MESSAGES; `message` its fixed text, so no key
 * material or payload can reach a log through an error.
 */
export class ChannelError extends Error {
  /** @param {string} code */
  constructor(code) {
    if (!Object.hasOwn(CHANNEL_MESSAGES, code)) throw new TypeError(`unknown channel error code ${code}`);
    super(`${code}: ${CHANNEL_MESSAGES[code]}`);
    this.name = "ChannelError";
    /** @type {string} */
    this.code = code;
  }
}
