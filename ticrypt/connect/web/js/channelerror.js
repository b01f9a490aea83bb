// The one error of the secure channel (PROTOCOL.md §4 Errors).  Its codes
// and fixed human messages are one table, ticrypt/channel/errors.py's
// MESSAGES, which ticrypt-connect serves as channelerrors.json.

import messages from "./channelerrors.json" with { type: "json" };

/** Every code a ChannelError can carry, with its fixed human message. */
export const CHANNEL_MESSAGES = Object.freeze(messages);

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
