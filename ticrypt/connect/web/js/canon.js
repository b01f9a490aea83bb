// Canonical JSON (PROTOCOL.md §2 Encodings): exactly Python's
// json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True),
// and the strict parser of §4 Handshake messages.

import { ChannelError } from "./channelerror.js";

/** Longest handshake message (§4). */
export const MAX_HANDSHAKE_CHARS = 4096;
/** Deepest nesting of arrays and objects accepted from the network (§2). */
export const MAX_JSON_DEPTH = 32;

/**
 * Deepest bracket nesting of JSON `text`, brackets inside strings ignored
 * (checked before parsing, as ticrypt.encoding.loads_bounded does).
 * @param {string} text
 * @returns {number}
 */
export function jsonDepth(text) {
  let depth = 0;
  let deepest = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "[" || c === "{") deepest = Math.max(deepest, ++depth);
    else if (c === "]" || c === "}") depth--;
  }
  return deepest;
}

const SHORT_ESCAPES = { '"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f" };

/** A JSON string literal as Python's ensure_ascii writes it. */
function quote(s) {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    const c = s.charCodeAt(i);
    if (Object.hasOwn(SHORT_ESCAPES, ch)) out += SHORT_ESCAPES[ch];
    else if (c < 0x20 || c > 0x7e) out += "\\u" + c.toString(16).padStart(4, "0");
    else out += ch;
  }
  return out + '"';
}

/** Python's str ordering: by code point (JS's default sort is by UTF-16 unit). */
function byCodePoint(a, b) {
  const x = Array.from(a, (c) => c.codePointAt(0));
  const y = Array.from(b, (c) => c.codePointAt(0));
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    if (x[i] !== y[i]) return x[i] - y[i];
  }
  return x.length - y.length;
}

/**
 * Canonical JSON text of `value`: objects with sorted keys, no whitespace,
 * everything outside printable ASCII escaped as \uXXXX (lower-case hex).
 * Numbers must be safe integers (the protocol has no others; Python and
 * JavaScript write other numbers differently).
 * @param {*} value null, boolean, safe integer, string, array or plain object
 * @returns {string}
 * @throws {TypeError} for any other value
 */
export function canonical(value) {
  if (value === null) return "null";
  switch (typeof value) {
    case "boolean":
      return value ? "true" : "false";
    case "number":
      if (!Number.isSafeInteger(value)) throw new TypeError("canonical JSON: only safe integers");
      return String(value);
    case "string":
      return quote(value);
    case "object":
      if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
      if (Object.getPrototypeOf(value) !== Object.prototype && Object.getPrototypeOf(value) !== null) {
        throw new TypeError("canonical JSON: not a plain object");
      }
      return "{" + Object.keys(value).sort(byCodePoint)
        .map((k) => quote(k) + ":" + canonical(value[k])).join(",") + "}";
    default:
      throw new TypeError(`canonical JSON: cannot encode a ${typeof value}`);
  }
}

/**
 * Parse `text` that must be exactly canonical(obj) of a JSON object
 * (§4 Handshake messages): refuses text over `maxChars`, nesting deeper
 * than MAX_JSON_DEPTH, invalid JSON,
 * anything but an object, duplicate keys, and any other spelling of the same
 * object (whitespace, key order, escapes, 1.0 for 1).
 * @param {string} text
 * @param {number} [maxChars]
 * @returns {Object}
 * @throws {ChannelError} bad-message
 */
export function parseCanonical(text, maxChars = MAX_HANDSHAKE_CHARS) {
  if (typeof text !== "string" || text.length > maxChars || jsonDepth(text) > MAX_JSON_DEPTH) throw new ChannelError("bad-message");
  let obj;
  try {
    obj = JSON.parse(text);
    // A duplicate key parses to one key: the re-encoding is then shorter.
    if (obj === null || typeof obj !== "object" || Array.isArray(obj) || canonical(obj) !== text) {
      obj = undefined;
    }
  } catch {
    obj = undefined;
  }
  if (obj === undefined) throw new ChannelError("bad-message");
  return obj;
}
