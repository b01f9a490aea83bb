// exec: a command line run on the VM as ["sh", "-c", TEXT] without input,
// its stdout and stderr streamed as they come, then its exit status.

import { errorCode, errorText } from "./vmconn.js";
import { button, el, notice, show } from "./ui.js";

const MAX_SHOWN = 1024 * 1024;  // characters of output kept on the page

export function execPanel(conn) {
  const input = el("input", { type: "text", id: "exec-command", spellcheck: "false",
    autocomplete: "off", placeholder: "uname -a", "data-test": "exec-command" });
  const output = el("pre", { class: "exec-output", "data-test": "exec-output" });
  const status = el("div", { class: "status", "data-test": "exec-status", "data-state": "idle" });
  const run = button("Run", () => start(), { "data-test": "exec-run", class: "primary" });
  const cancel = button("Cancel", () => { if (request) request.cancel(); },
    { "data-test": "exec-cancel", class: "secondary", hidden: true });
  const form = el("form", { class: "inline", onsubmit: (ev) => { ev.preventDefault(); start(); } },
    el("label", { for: "exec-command" }, "sh -c"), input, run, cancel);
  const node = el("div", { class: "panel" }, form, status, output);
  let request = null;
  let shown = 0;

  function setStatus(kind, text, code = null, exit = null) {
    status.setAttribute("data-state", kind);
    if (exit === null) status.removeAttribute("data-exit");
    else status.setAttribute("data-exit", String(exit));
    show(status, text ? notice({ running: "progress", exited: exit === 0 ? "ok" : "info",
      failed: "error" }[kind] || "info", text, { test: "exec-message", code }) : []);
  }

  const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };

  function out(kind, bytes) {
    const text = decoders[kind].decode(bytes, { stream: true });
    if (!text || shown > MAX_SHOWN) return;
    shown += text.length;
    output.append(el("span", { class: kind }, shown > MAX_SHOWN
      ? `${text}\n[output cut: more than ${MAX_SHOWN} characters]` : text));
    output.scrollTop = output.scrollHeight;
  }

  async function start() {
    const text = input.value;
    if (request || !text.trim()) return;
    output.replaceChildren();
    shown = 0;
    decoders.stdout = new TextDecoder();
    decoders.stderr = new TextDecoder();
    run.disabled = true;
    setStatus("running", "Connecting…");
    const unlisten = conn.listen((s) => { if (s.state === "opening") setStatus("running", s.text); });
    let session;
    try {
      session = await conn.session();
    } catch (e) {
      setStatus("failed", errorText(e), errorCode(e));
      run.disabled = false;
      return;
    } finally {
      unlisten();
    }
    const r = session.exec(["sh", "-c", text], {
      onStdout: (b) => out("stdout", b), onStderr: (b) => out("stderr", b) });
    request = r;
    r.eof();  // no input: like ticrypt exec -n
    cancel.hidden = false;
    setStatus("running", `Running: sh -c ${text}`);
    try {
      const code = await r.done;
      setStatus("exited", `Exit status ${code}`, null, code);
    } catch (e) {
      const code = errorCode(e);
      setStatus("failed", code === "command-not-found"
        ? "sh was not found on the VM (command-not-found)" : errorText(e), code);
    } finally {
      request = null;
      cancel.hidden = true;
      run.disabled = false;
    }
  }

  return {
    node,
    show() { node.hidden = false; input.focus(); },
    hide() { node.hidden = true; },
    dispose() { if (request) request.cancel(); },
  };
}
