// Websocket closes as the user reads them (PROTOCOL.md §1.2, §4 Errors),
// with the wording of ticrypt/closecodes.py and ticrypt/frontend/errors.py.
// The close codes and the explanations of reason names are one table,
// ticrypt/closecodes.py's ALL and REASON_HUMAN, which ticrypt-connect serves
// as closecodes.json.

import { CHANNEL_MESSAGES } from "./channelerror.js";
import table from "./closecodes.json" with { type: "json" };

/** Close codes: number -> [name, human line] (ticrypt/closecodes.py ALL). */
export const CLOSE_CODES = Object.freeze(Object.fromEntries(
  Object.entries(table.codes).map(([code, entry]) => [code, Object.freeze([...entry])])));

/** Reason names under 4400 (and a few end-to-end ones) that are not close codes. */
export const REASON_HUMAN = Object.freeze({ ...table.reasons });

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
