// Websocket closes as the user reads them (PROTOCOL.md §1.2, §4 Errors),
// with the wording of ticrypt/closecodes.py and ticrypt/frontend/errors.py.

import { CHANNEL_MESSAGES } from "./channelerror.js";

/** Close codes: number -> [name, human line] (ticrypt/closecodes.py). */
export const CLOSE_CODES = Object.freeze({
  1000: ["normal", "the session ended"],
  1001: ["going-away", "the far end is going away"],
  1009: ["message-too-big", "a message was over the proxy's size limit"],
  1011: ["server-error", "the proxy failed unexpectedly"],
  4000: ["bad-message", "a malformed control message"],
  4001: ["vm-auth-failed", "the VM could not prove its identity"],
  4003: ["ticket-refused", "the proxy refused the connection ticket"],
  4004: ["no-vm-available", "the VM is not connected to the proxy (is it running?)"],
  4008: ["timeout", "timed out"],
  4009: ["over-limit", "too many connections"],
  4010: ["peer-lost", "the other end vanished without closing"],
  4011: ["revoked", "access was revoked at the backend (user disabled or session ended); sign in again if you still may"],
  4013: ["proxy-unreachable", "ticrypt-connect could not reach the proxy (is the backend up? is connect's [page] configured?)"],
  4400: ["channel-error", "the secure channel failed"],
  4401: ["not-authorized", "you are not authorized on this VM; ask its owner to run 'ticrypt authorize VM YOU'"],
});

/** Reason names under 4400 (and a few end-to-end ones) that are not close codes. */
export const REASON_HUMAN = Object.freeze({
  "vm-key-mismatch": "the VM presented a key other than the one registered in rest; refusing to talk to it",
  "window-exceeded": "this client sent the VM more input than it allowed (a client bug)",
  "record-too-large": "a record was over the size limit of the far end",
});

/** Close codes of a lost connection (no close frame). */
const LOST = new Set([1005, 1006]);

/**
 * Text from the far end as one printable line of at most `limit` characters:
 * control, format and separator characters (newlines, escapes, bidi
 * overrides) become "?", so a hostile proxy or VM cannot forge lines.
 * @param {*} text
 * @param {number} [limit]
 * @returns {string}
 */
export function oneLine(text, limit = 300) {
  return Array.from(String(text ?? "")).slice(0, limit).join("").replace(/(?! )[\p{C}\p{Z}]/gu, "?");
}

/**
 * [name, text] of a close reason: the name ends at the first ":" or space.
 * @param {string} reason
 * @returns {[string, string]}
 */
export function splitReason(reason) {
  const text = String(reason ?? "").trim();
  const cuts = [text.indexOf(":"), text.indexOf(" ")].filter((i) => i >= 0);
  const cut = cuts.length ? Math.min(...cuts) : text.length;
  return [text.slice(0, cut), text.slice(cut + 1).trim()];
}

/** The explanation of a close code's or reason's name, if known. */
export function humanOf(name) {
  for (const [codeName, human] of Object.values(CLOSE_CODES)) if (codeName === name) return human;
  return REASON_HUMAN[name] ?? null;
}

/** What a secure-channel failure named `code` means (4400 reasons). */
export function explainChannel(code) {
  return REASON_HUMAN[code] ?? CHANNEL_MESSAGES[code] ?? humanOf(code);
}

/**
 * A websocket close as the user reads it: named after the close code, or
 * for 4400 (and 1000 and unknown codes) after the reason's name.
 * @param {number|null} code
 * @param {string|null} reason as received (untrusted)
 * @returns {{code: number|null, name: string, text: string, human: string, line: string}}
 *   `name` stable kebab-case; `human` the explanation; `text` what the far
 *   end added (sanitized); `line` "name: human (text)" for display.
 */
export function describeClose(code, reason) {
  const raw = oneLine(reason ?? "", 200).trim();
  const [reasonName, detail] = splitReason(raw);
  const entry = CLOSE_CODES[code];
  let name;
  let human;
  if (code === null || code === undefined || LOST.has(code)) {
    name = "connection-lost";
    human = "the connection was lost (ticrypt-connect stopped or the network failed)";
  } else if (code === 4400) {
    name = reasonName || "channel-error";
    human = explainChannel(name);
  } else if (entry === undefined || code === 1000) {
    name = reasonName || (entry ? entry[0] : "closed");
    human = humanOf(name) ?? (entry ? entry[1] : null);
  } else {
    [name, human] = entry;
  }
  let text = "";
  if (reasonName === name) text = detail;
  else if (raw && !LOST.has(code)) text = raw;
  if (!human) human = `connection closed (${code}${raw ? " " + raw : ""})`;
  const line = `${name}: ${human}${text ? ` (${text})` : ""}`;
  return { code: code ?? null, name, text, human, line };
}
