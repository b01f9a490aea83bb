// The users authorized on a VM (owner only): list, authorize, revoke.  A
// revoked user's open channels are closed by the VM (4401).

import { api, restSession } from "./rest.js";
import { errorCode, errorText } from "./vmconn.js";
import { busy, button, el, notice, oneLine, show } from "./ui.js";

const KEY = /^ed25519:[A-Za-z0-9_-]{43}$/;

export function usersPanel(conn) {
  const list = el("div", { "data-test": "users-box" });
  const status = el("div", { class: "status", "data-test": "users-status" });
  const name = el("input", { type: "text", id: "authorize-name", spellcheck: "false",
    "data-test": "authorize-name" });
  const key = el("input", { type: "text", id: "authorize-key", spellcheck: "false",
    placeholder: "ed25519:… (a superadmin may leave it empty: rest's key)",
    "data-test": "authorize-key" });
  const add = button("Authorize", (ev) => busy(ev.target, authorize),
    { "data-test": "authorize-submit", class: "primary" });
  const refresh = button("Refresh", (ev) => busy(ev.target, load),
    { "data-test": "users-refresh", class: "secondary" });
  const node = el("div", { class: "panel" },
    el("div", { class: "title-row" }, el("h2", {}, "Authorized users"), refresh),
    list,
    el("h3", {}, "Authorize a user"),
    el("div", { class: "form" }, el("label", { for: "authorize-name" }, "User name"), name,
      el("label", { for: "authorize-key" }, "Public key"), key),
    el("div", { class: "actions" }, add),
    status);
  let loaded = false;

  function fail(e, what) {
    const code = errorCode(e);
    const text = code === "not-owner"
      ? "Only the VM's owner may see and change who may use it (not-owner)."
      : `${what}: ${errorText(e)}`;
    show(status, notice("error", text, { test: "users-error", code }));
  }

  async function load() {
    show(list, notice("progress", "Asking the VM…", { test: "users-progress" }));
    let answer;
    try {
      answer = await (await conn.session()).users();
    } catch (e) {
      show(list);
      fail(e, "The VM did not list its users");
      return;
    }
    loaded = true;
    const owner = answer.owner || {};
    const rows = [el("tr", { "data-test": "user-row", "data-name": oneLine(owner.name, 128),
      "data-role": "owner" }, el("td", {}, oneLine(owner.name, 128)), el("td", {}, "owner"),
    el("td", { class: "mono" }, oneLine(owner.key, 80)), el("td", {}))];
    for (const u of answer.users || []) {
      rows.push(el("tr", { "data-test": "user-row", "data-name": oneLine(u.name, 128),
        "data-role": "user" },
      el("td", {}, oneLine(u.name, 128)), el("td", {}, "user"),
      el("td", { class: "mono" }, oneLine(u.key, 80)),
      el("td", {}, button("Revoke", (ev) => busy(ev.target, () => revoke(u)),
        { "data-test": "user-revoke", "data-name": oneLine(u.name, 128), class: "danger small" }))));
    }
    show(list, el("table", { class: "list", "data-test": "users-list" },
      el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "Role"),
        el("th", {}, "Key"), el("th", {}, ""))),
      el("tbody", {}, rows)));
  }

  async function lookupKey(user) {
    const session = restSession();
    if (!session || session.role !== "superadmin") {
      throw Object.assign(new Error("give the user's public key (ed25519:…): only a "
        + "superadmin can look it up at rest"), { code: "key-needed" });
    }
    const found = (await api.users()).find((u) => u.name === user);
    if (!found) throw Object.assign(new Error(`rest knows no user ${user}`), { code: "no-such-user" });
    return found.public_key;
  }

  async function authorize() {
    show(status);
    const user = name.value.trim();
    if (!user) return show(status, notice("error", "Type the user's name.", { test: "users-error" }));
    try {
      const k = key.value.trim() || await lookupKey(user);
      if (!KEY.test(k)) throw Object.assign(new Error("the key must be ed25519:<base64url>"),
        { code: "bad-key" });
      const answer = await (await conn.session()).authorize(k, user);
      show(status, notice("ok", `${answer.added ? "Authorized" : "Updated"} ${oneLine(user, 128)}`,
        { test: "users-ok" }));
      name.value = "";
      key.value = "";
    } catch (e) {
      fail(e, `Cannot authorize ${user}`);
      return;
    }
    await load();
  }

  async function revoke(u) {
    show(status);
    try {
      await (await conn.session()).revoke({ key: u.key });
      show(status, notice("ok", `Revoked ${oneLine(u.name, 128)}: their open sessions on this `
        + "VM are closed", { test: "users-ok" }));
    } catch (e) {
      fail(e, `Cannot revoke ${u.name}`);
      return;
    }
    await load();
  }

  return {
    node,
    show() { node.hidden = false; if (!loaded) load(); },
    hide() { node.hidden = true; },
    dispose() {},
  };
}
