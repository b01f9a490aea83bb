// The VMs rest shows the user (their own; a superadmin's: all), and "open
// a VM by id" for a VM another owner authorized them on.

import { api } from "./rest.js";
import { busy, button, el, notice, oneLine, show } from "./ui.js";

const VM_ID = /^vm-[0-9a-f]{16}$/;

const STATE_TEXT = {
  enrolled: "enrolled",
  created: "not enrolled yet",
  disabled: "disabled",
};

export function vmsView(target, ctx) {
  const list = el("div", { "data-test": "vm-list-box" },
    notice("progress", "Loading your VMs…", { test: "vm-list-progress" }));
  const idInput = el("input", { type: "text", id: "vm-open-id", placeholder: "vm-…",
    spellcheck: "false", "data-test": "vm-open-id" });
  const openStatus = el("div", { class: "status" });
  const openBtn = button("Open", () => {
    const id = idInput.value.trim();
    if (!VM_ID.test(id)) {
      show(openStatus, notice("error", "A VM id is vm- and 16 hex digits.",
        { test: "vm-open-error" }));
      return;
    }
    ctx.go(`#/vm/${id}/terminal`);
  }, { "data-test": "vm-open" });
  let alive = true;

  async function load() {
    let vms;
    try {
      vms = await api.vms();
    } catch (e) {
      if (alive) show(list, notice("error", `rest did not list the VMs: ${e.human || e.message}`,
        { test: "vm-list-error", code: e.code }));
      return;
    }
    if (!alive) return;
    if (!vms.length) {
      show(list, el("p", { "data-test": "vm-list-empty" }, "rest shows you no VMs. A VM "
        + "another user authorized you on can be opened by its id below."));
      return;
    }
    show(list, el("table", { class: "list", "data-test": "vm-list" },
      el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "State"),
        el("th", {}, "Owner"), el("th", {}, "Id"), el("th", {}, ""))),
      el("tbody", {}, vms.map((vm) => {
        const id = String(vm.id);
        const usable = vm.state === "enrolled";
        return el("tr", { "data-test": "vm-row", "data-vm-id": id,
          "data-vm-name": oneLine(vm.name, 64), "data-state": oneLine(vm.state, 16) },
        el("td", {}, el("a", { href: `#/vm/${id}/terminal`, "data-test": "vm-link" },
          oneLine(vm.name, 64))),
        el("td", {}, el("span", { class: `state state-${usable ? "ok" : "off"}`,
          "data-test": "vm-state" }, STATE_TEXT[vm.state] || oneLine(vm.state, 16))),
        el("td", {}, oneLine(vm.owner, 64)),
        el("td", { class: "mono" }, id),
        el("td", {}, el("div", { class: "row-actions" },
          el("a", { href: `#/vm/${id}/terminal`, class: "button small" }, "Terminal"),
          el("a", { href: `#/vm/${id}/exec`, class: "button small" }, "Exec"),
          el("a", { href: `#/vm/${id}/tunnels`, class: "button small" }, "Tunnels"))));
      }))));
  }

  const refresh = button("Refresh", (ev) => busy(ev.target, load),
    { "data-test": "vm-refresh", class: "secondary" });
  show(target, el("div", { class: "stack" },
    el("section", { class: "card" },
      el("div", { class: "title-row" }, el("h1", {}, "Your VMs"), refresh),
      list),
    el("section", { class: "card" },
      el("h2", {}, "Open a VM by id"),
      el("p", { class: "hint" }, "rest lists only the VMs you own; the owner of another VM "
        + "may have authorized you on it."),
      el("div", { class: "inline" }, idInput, openBtn), openStatus)));
  load();
  return { dispose() { alive = false; } };
}
