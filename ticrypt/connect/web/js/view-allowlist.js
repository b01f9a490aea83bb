// The license servers VMs may reach (superadmins): list, add, remove.

import { api } from "./rest.js";
import { busy, button, el, notice, oneLine, show } from "./ui.js";

export function allowlistView(target, ctx) {
  const list = el("div", { "data-test": "allow-box" },
    notice("progress", "Loading the allow-list…", { test: "allow-progress" }));
  const status = el("div", { class: "status", "data-test": "allow-status" });
  const name = el("input", { type: "text", id: "allow-name", spellcheck: "false",
    placeholder: "license.example.org or *.example.org", "data-test": "allow-name" });
  const ports = el("input", { type: "text", id: "allow-ports", placeholder: "27000, 27001",
    "data-test": "allow-ports" });
  const proto = el("select", { id: "allow-protocol", "data-test": "allow-protocol" },
    el("option", { value: "tcp" }, "TCP"), el("option", { value: "udp" }, "UDP"));
  const comment = el("input", { type: "text", id: "allow-comment", maxlength: "200",
    "data-test": "allow-comment" });
  const add = button("Add", (ev) => busy(ev.target, doAdd), { "data-test": "allow-add",
    class: "primary" });
  const adding = el("div", { "data-test": "allow-add-form", hidden: true },
    el("h2", {}, "Add an entry"),
    el("div", { class: "form" },
      el("label", { for: "allow-name" }, "Name"), name,
      el("label", { for: "allow-ports" }, "Ports"), ports,
      el("label", { for: "allow-protocol" }, "Protocol"), proto,
      el("label", { for: "allow-comment" }, "Comment"), comment),
    el("div", { class: "actions" }, add));
  let alive = true;

  function error(e, what) {
    show(status, notice("error", `${what}: ${e.human || e.message}`,
      { test: "allow-error", code: e.code }));
  }

  async function load() {
    let entries;
    try {
      entries = await api.allowlist();
    } catch (e) {
      if (!alive) return;
      if (e.code === "forbidden") {
        // not a superadmin: no form, one clear state with rest's own line
        adding.hidden = true;
        show(status);
        show(list, notice("error", "Superadmins only: rest refused to show the allow-list to "
          + `${oneLine(ctx.session()?.user ?? "you", 64)}: ${e.human || e.message}`,
        { test: "allow-forbidden", code: e.code }));
        return;
      }
      show(list);
      adding.hidden = false;
      error(e, "rest did not list the allow-list");
      return;
    }
    if (!alive) return;
    adding.hidden = false;
    if (!entries.length) {
      show(list, el("p", { "data-test": "allow-empty" }, "The allow-list is empty: VMs reach "
        + "no license server."));
      return;
    }
    show(list, el("table", { class: "list", "data-test": "allow-list" },
      el("thead", {}, el("tr", {}, ...["Name", "Protocol", "Ports", "Comment", ""]
        .map((h) => el("th", {}, h)))),
      el("tbody", {}, entries.map((e) => el("tr", { "data-test": "allow-row",
        "data-id": oneLine(e.id, 32), "data-name": oneLine(e.name, 253) },
      el("td", { class: "mono" }, oneLine(e.name, 253)),
      el("td", {}, oneLine(e.protocol, 8)),
      el("td", {}, (e.ports || []).map(Number).join(", ")),
      el("td", {}, oneLine(e.comment, 200)),
      el("td", {}, button("Remove", (ev) => busy(ev.target, () => doRemove(e)),
        { "data-test": "allow-remove", "data-id": oneLine(e.id, 32), class: "danger small" })))))));
  }

  async function doAdd() {
    show(status);
    const portList = ports.value.split(/[\s,]+/).filter(Boolean).map((p) => Number(p));
    if (!portList.length || portList.some((p) => !Number.isInteger(p) || p < 1 || p > 65535)) {
      show(status, notice("error", "Ports: 1 to 32 numbers 1..65535, separated by commas.",
        { test: "allow-error", code: "bad-ports" }));
      return;
    }
    try {
      const entry = await api.addAllow({ name: name.value.trim(),
        ports: [...new Set(portList)].sort((a, b) => a - b), protocol: proto.value,
        comment: comment.value });
      show(status, notice("ok", `Added ${oneLine(entry.name, 253)} ${oneLine(entry.protocol, 8)}`,
        { test: "allow-ok" }));
      name.value = ""; ports.value = ""; comment.value = "";
    } catch (e) {
      error(e, "rest refused the entry");
    }
    await load();
  }

  async function doRemove(entry) {
    show(status);
    try {
      await api.removeAllow(entry.id);
      show(status, notice("ok", `Removed ${oneLine(entry.name, 253)}`, { test: "allow-ok" }));
    } catch (e) {
      error(e, `Cannot remove ${entry.name}`);
    }
    await load();
  }

  show(target, el("section", { class: "card", "data-test": "allowlist-view" },
    el("h1", {}, "License-server allow-list"),
    el("p", { class: "hint" }, "VMs may reach these names and ports, and nothing else "
      + "outside. A non-ASCII name is typed as its punycode (xn--…)."),
    list, adding, status));
  load();
  return { dispose() { alive = false; } };
}
