// One VM: its state, the secure session's state, and tabs for a terminal,
// exec, its users and its tunnels.  The session is opened when a tab first
// needs it and closed when the page leaves the VM.

import { api } from "./rest.js";
import { execPanel } from "./view-exec.js";
import { terminalPanel } from "./view-terminal.js";
import { tunnelsPanel } from "./view-tunnels.js";
import { usersPanel } from "./view-users.js";
import { VmConn, errorCode, errorText } from "./vmconn.js";
import { button, el, notice, oneLine, show } from "./ui.js";

const TABS = [["terminal", "Terminal"], ["exec", "Exec"], ["users", "Users"],
  ["tunnels", "Tunnels"]];

export function vmView(target, ctx, vmId, firstTab) {
  const conn = new VmConn(ctx, vmId);
  const title = el("div", { class: "vm-title", "data-test": "vm-title" },
    el("h1", {}, oneLine(vmId, 32)));
  const sessionBox = el("div", { class: "session-state", "data-test": "vm-session",
    "data-state": "idle" });
  const tabBar = el("nav", { class: "tabs" });
  const body = el("div", { class: "tab-body" });
  const vm = { id: vmId, name: null };
  let panels = null;
  let tab = null;
  let disposed = false;

  const reconnect = button("Connect again", () => conn.session().catch(() => {}),
    { "data-test": "vm-reconnect", class: "secondary small" });
  conn.listen((s) => {
    sessionBox.setAttribute("data-state", s.state);
    if (s.code) sessionBox.setAttribute("data-code", s.code);
    else sessionBox.removeAttribute("data-code");
    const tone = { open: "ok", opening: "progress", failed: "error" }[s.state] || "info";
    const text = s.state === "open" && conn.info
      ? `${s.text} with ${oneLine(conn.info.hostname, 64)} (vmc ${oneLine(conn.info.version, 32)})`
      : s.text;
    show(sessionBox, notice(tone, text, { test: "vm-session-state", code: s.code,
      extra: s.state === "failed" || s.state === "closed" ? [" ", reconnect] : [] }));
  });

  function setTab(name) {
    if (!TABS.some(([n]) => n === name)) name = "terminal";
    if (!panels) { tab = name; return; }
    tab = name;
    for (const [n, panel] of Object.entries(panels)) {
      if (n === name) panel.show();
      else panel.hide();
    }
    for (const a of tabBar.children) {
      a.classList.toggle("active", a.getAttribute("data-tab") === name);
    }
  }

  async function load() {
    let info;
    try {
      info = await api.vm(vmId);
    } catch (e) {
      if (!disposed) show(body, notice("error", `rest does not show this VM: ${errorText(e)}`,
        { test: "vm-error", code: errorCode(e) }));
      return;
    }
    if (disposed) return;
    vm.name = typeof info.name === "string" ? info.name : null;
    show(title, el("h1", {}, oneLine(info.name || vmId, 64)),
      el("span", { class: `state state-${info.state === "enrolled" ? "ok" : "off"}`,
        "data-test": "vm-state" }, oneLine(info.state, 16)),
      el("span", { class: "hint" }, `${oneLine(vmId, 32)} · owner ${oneLine(info.owner, 64)}`));
    if (info.state !== "enrolled") {
      show(body, notice("error", info.state === "disabled" ? "This VM is disabled."
        : "This VM has not enrolled yet: its controller (ticrypt-vmc) has not started.",
      { test: "vm-error", code: info.state === "disabled" ? "vm-disabled" : "vm-not-enrolled" }));
      return;
    }
    panels = { terminal: terminalPanel(conn), exec: execPanel(conn), users: usersPanel(conn),
      tunnels: tunnelsPanel(ctx, { vm, conn }) };
    for (const p of Object.values(panels)) p.hide();
    show(body, ...Object.values(panels).map((p) => p.node));
    setTab(tab);
  }

  show(tabBar, TABS.map(([name, label]) => el("a", { href: `#/vm/${vmId}/${name}`,
    "data-tab": name, "data-test": `tab-${name}` }, label)));
  show(target, el("section", { class: "card vm", "data-test": "vm-view", "data-vm-id": vmId },
    el("div", { class: "title-row" }, title, el("a", { href: "#/vms" }, "← all VMs")),
    sessionBox, tabBar, body));
  tab = firstTab;
  load();

  return {
    setTab,
    dispose() {
      disposed = true;
      if (panels) for (const p of Object.values(panels)) p.dispose();
      conn.close();
    },
  };
}
