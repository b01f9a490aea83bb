// A terminal on the VM: xterm.js (served by connect from npm's
// node_modules at /vendor/) on a shell request of the secure session.
// The terminal's size follows its box (window resizes), pasting goes
// through xterm.js, and the shell's exit status (or why the session ended)
// is shown under it.

import { errorCode, errorText } from "./vmconn.js";
import { button, el, notice, show } from "./ui.js";

let vendor = null;

function loadXterm() {
  if (!vendor) {
    vendor = Promise.all([import("/vendor/xterm.mjs"), import("/vendor/addon-fit.mjs")])
      .then(([x, f]) => ({ Terminal: x.Terminal, FitAddon: f.FitAddon }));
    vendor.catch(() => { vendor = null; });
  }
  return vendor;
}

/**
 * xterm.js writes its cell sizes and theme colors into <style> elements it
 * adds to the terminal, which the page's CSP (style-src 'self', no
 * 'unsafe-inline') would refuse (one console violation per element and
 * change).  xterm.js makes them through its `documentOverride`:
 * `inertStyles()` gives it the page's document with one difference, a
 * "style" it asks for is an inert <xterm-style> element (hidden by app.css,
 * never applied, so never refused), and `mirrorStyles()` copies their text
 * into constructed style sheets (CSSOM, which CSP allows), kept in step on
 * every change.  The policy stays strict and the terminal renders; only
 * 24-bit colours (style attributes on single cells) stay unapplied.
 */
const INERT_STYLE = "xterm-style";

function inertName(name) {
  return String(name).toLowerCase() === "style" ? INERT_STYLE : name;
}

function inertStyles() {
  return new Proxy(document, {
    get(target, prop) {
      if (prop === "createElement") {
        return (name, options) => target.createElement(inertName(name), options);
      }
      const value = Reflect.get(target, prop, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}

/**
 * `term.open(box)` with the same rule for the one <style> xterm.js makes
 * through the page's own document while it opens (its scrollbar's colours);
 * open() is synchronous, so the page's document is itself again at once.
 */
function openInert(term, box) {
  const own = Object.prototype.hasOwnProperty.call(document, "createElement");
  const real = document.createElement;
  document.createElement = function createElement(name, options) {
    return real.call(this, inertName(name), options);
  };
  try {
    term.open(box);
  } finally {
    if (own) document.createElement = real;
    else delete document.createElement;
  }
}

function mirrorStyles(root) {
  const mirrored = new Map();  // <style> -> {sheet, text}
  const ours = new Set();
  const sync = () => {
    for (const style of root.querySelectorAll(`style, ${INERT_STYLE}`)) {
      let m = mirrored.get(style);
      if (!m) {
        m = { sheet: new CSSStyleSheet(), text: null };
        mirrored.set(style, m);
        ours.add(m.sheet);
      }
      if (m.text !== style.textContent) {
        m.text = style.textContent;
        m.sheet.replaceSync(m.text);
      }
    }
    for (const [style, m] of mirrored) {
      if (!style.isConnected) {
        mirrored.delete(style);
        ours.delete(m.sheet);
      }
    }
    const others = document.adoptedStyleSheets.filter((s) => !ours.has(s) && !s.ticryptXterm);
    const wanted = [...mirrored.values()].map((m) => m.sheet);
    for (const sheet of wanted) sheet.ticryptXterm = true;
    document.adoptedStyleSheets = [...others, ...wanted];
  };
  const observer = new MutationObserver(sync);
  observer.observe(root, { subtree: true, childList: true, characterData: true });
  sync();
  return () => {
    observer.disconnect();
    document.adoptedStyleSheets = document.adoptedStyleSheets.filter((s) => !ours.has(s));
  };
}

function binaryBytes(text) {
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i += 1) out[i] = text.charCodeAt(i) & 0xff;
  return out;
}

export function terminalPanel(conn) {
  const box = el("div", { class: "terminal-box", "data-test": "terminal" });
  const state = el("div", { class: "terminal-state", "data-test": "terminal-state",
    "data-state": "idle" });
  const again = button("New terminal", () => start(), { "data-test": "terminal-new",
    class: "secondary", hidden: true });
  const node = el("div", { class: "panel" }, box,
    el("div", { class: "terminal-bar" }, state, again));

  let term = null;
  let fit = null;
  let shell = null;      // the running shell request
  let resizeObs = null;
  let unmirror = null;
  let disposed = false;
  let started = false;

  function setState(kind, text, code = null) {
    state.setAttribute("data-state", kind);
    if (code) state.setAttribute("data-code", code);
    else state.removeAttribute("data-code");
    const tone = { running: "ok", exited: "info", failed: "error", starting: "progress" }[kind]
      || "info";
    show(state, notice(tone, text, { test: "terminal-message", code }));
    again.hidden = kind === "running" || kind === "starting";
  }

  async function ensureTerminal() {
    if (term) return;
    const { Terminal, FitAddon } = await loadXterm();
    term = new Terminal({ cursorBlink: true, scrollback: 5000, fontSize: 14,
      fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace",
      theme: { background: "#111418", foreground: "#d8dee9" },
      documentOverride: inertStyles() });
    fit = new FitAddon();
    term.loadAddon(fit);
    openInert(term, box);
    unmirror = mirrorStyles(box);
    fit.fit();
    term.onData((data) => { if (shell) shell.write(data); });
    term.onBinary((data) => { if (shell) shell.write(binaryBytes(data)); });
    term.onResize(({ rows, cols }) => { if (shell) shell.resize(rows, cols); });
    resizeObs = new ResizeObserver(() => {
      if (!box.hidden && box.offsetWidth > 0 && box.offsetHeight > 0) fit.fit();
    });
    resizeObs.observe(box);
  }

  async function start() {
    if (disposed || shell) return;
    started = true;
    setState("starting", "Opening a terminal…");
    try {
      await ensureTerminal();
    } catch (e) {
      setState("failed", "xterm.js is not installed at /vendor/ (run npm ci in "
        + "ticrypt/connect/web, then restart ticrypt-connect)", "no-xterm");
      return;
    }
    let session;
    const unlisten = conn.listen((s) => {
      if (s.state === "opening") setState("starting", s.text);
    });
    try {
      session = await conn.session();
    } catch (e) {
      unlisten();
      setState("failed", errorText(e), errorCode(e));
      return;
    }
    unlisten();
    if (disposed) return;
    term.reset();
    fit.fit();
    const request = session.shell({ rows: term.rows, cols: term.cols, term: "xterm-256color" },
      { onOutput: (bytes) => term.write(bytes) });
    shell = request;
    setState("running", "Terminal open (the secure channel carries every key you type)");
    term.focus();
    // a session that ends (revoked, VM stopping, idle) ends the shell too
    const stop = conn.listen((s) => {
      if (shell === request && s.state === "failed") {
        shell = null;
        setState("failed", s.text, s.code);
      }
    });
    try {
      const status = await request.done;
      if (shell === request) {
        shell = null;
        setState("exited", `The shell exited with status ${status}`, `exit-${status}`);
        state.setAttribute("data-exit", String(status));
      }
    } catch (e) {
      if (shell === request) {
        shell = null;
        setState("failed", errorText(e), errorCode(e));
      }
    } finally {
      stop();
    }
  }

  return {
    node,
    show() {
      node.hidden = false;
      if (!started) start();
      else if (fit) { fit.fit(); if (term) term.focus(); }
    },
    hide() { node.hidden = true; },
    dispose() {
      disposed = true;
      if (shell) shell.cancel();
      shell = null;
      if (resizeObs) resizeObs.disconnect();
      if (term) term.dispose();
      if (unmirror) unmirror();
    },
  };
}
