// Small DOM helpers for the page's views: elements are built with
// createElement and text nodes only (never innerHTML), so text from rest,
// connect or the VM can never become markup.

/** el("div", {class: "x", "data-test": "y", onclick: fn}, child, "text", ...) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      node.className = value;
    } else if (key === "text") {
      node.textContent = String(value);
    } else if (value === true) {
      node.setAttribute(key, "");
    } else {
      node.setAttribute(key, String(value));
    }
  }
  append(node, ...children);
  return node;
}

export function append(node, ...children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

/** Replace the children of node. */
export function show(node, ...children) {
  clear(node);
  return append(node, ...children);
}

/** Text from the far end as one printable line (control characters -> "?"). */
export function oneLine(text, limit = 300) {
  return String(text ?? "").slice(0, limit).replace(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu, "?");
}

/**
 * A message box: kind "error" | "info" | "progress" | "ok"; data-test and
 * data-code let the tests read the state.
 */
export function notice(kind, text, { test = "notice", code = null, extra = [] } = {}) {
  return el("div", { class: `notice notice-${kind}`, "data-test": test, "data-code": code,
    role: kind === "error" ? "alert" : "status" }, oneLine(text, 600), ...extra);
}

export function button(label, onclick, attrs = {}) {
  return el("button", { type: "button", ...attrs, onclick }, label);
}

/** "1.5 KiB" like the CLI's tunnel list. */
export function size(n) {
  let value = Number(n) || 0;
  if (value < 1024) return `${value} B`;
  for (const unit of ["KiB", "MiB", "GiB"]) {
    value /= 1024;
    if (value < 1024 || unit === "GiB") return `${value.toFixed(1)} ${unit}`;
  }
  return `${value} B`;
}

export function when(ts) {
  if (!Number.isFinite(ts)) return "-";
  return new Date(ts * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

/** Run an async action from a button: disable it while it runs. */
export async function busy(btn, action) {
  btn.disabled = true;
  try {
    return await action();
  } finally {
    btn.disabled = false;
  }
}
