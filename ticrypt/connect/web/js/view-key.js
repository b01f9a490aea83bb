// The key: import the file `ticrypt keygen` writes (passphrase or not) once;
// the private key is kept non-extractable in the browser's key store.
// "Forget this key" removes it (and signs out).

import { b64encode } from "./b64.js";
import { importKeyFile } from "./keyfile.js";
import { forgetKey, saveKey } from "./keystore.js";
import { api, clearRestSession, restSession } from "./rest.js";
import { busy, button, el, notice, oneLine, show } from "./ui.js";

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const MAX_KEY_FILE = 64 * 1024;

export function publicKeyText(publicKey) {
  return `ed25519:${b64encode(publicKey)}`;
}

const KEY_ERRORS = {
  "not-a-key": "This file is not an Ed25519 private key (choose the file `ticrypt keygen` "
    + "wrote, not the .pub file).",
  "passphrase-needed": "This key is protected by a passphrase: type it above.",
  "bad-passphrase": "The passphrase is wrong.",
  unsupported: "This key file uses an encryption the page cannot read.",
};

export function keyView(target, ctx) {
  const status = el("div", { class: "status" });
  const file = el("input", { type: "file", id: "key-file", "data-test": "key-file" });
  const pass = el("input", { type: "password", id: "key-passphrase", autocomplete: "off",
    "data-test": "key-passphrase" });
  const user = el("input", { type: "text", id: "key-user", autocomplete: "username",
    spellcheck: "false", "data-test": "key-user", value: ctx.key ? ctx.key.user : "" });
  const importBtn = button("Import key", () => busy(importBtn, doImport),
    { "data-test": "key-import", class: "primary" });

  file.addEventListener("change", () => {
    const f = file.files && file.files[0];
    const stem = f ? f.name.replace(/\.(key|pem)$/, "") : "";
    if (f && !user.value && NAME.test(stem)) user.value = stem;
  });

  async function doImport() {
    const f = file.files && file.files[0];
    show(status);
    if (!f) return show(status, notice("error", "Choose your key file first.",
      { test: "key-error", code: "no-file" }));
    if (!NAME.test(user.value)) {
      return show(status, notice("error", "Type the user name rest knows you by "
        + "(letters, digits, . _ -).", { test: "key-error", code: "bad-user" }));
    }
    if (f.size > MAX_KEY_FILE) {
      return show(status, notice("error", "This file is too large to be a key file.",
        { test: "key-error", code: "not-a-key" }));
    }
    let key;
    try {
      key = await importKeyFile(await f.text(), pass.value);
    } catch (e) {
      const text = KEY_ERRORS[e.code] || e.message;
      if (e.code === "passphrase-needed" || e.code === "bad-passphrase") pass.focus();
      return show(status, notice("error", text, { test: "key-error", code: e.code || "error" }));
    }
    pass.value = "";
    const record = { user: user.value, privateKey: key.privateKey, publicKey: key.publicKey };
    await saveKey(record);
    const signedInAs = restSession();
    if (signedInAs && signedInAs.user !== record.user) clearRestSession();
    ctx.key = record;
    ctx.signinReason = null;
    ctx.flash("ok", `Key imported for ${record.user}: ${publicKeyText(record.publicKey)}`);
    ctx.go("#/signin");
  }

  async function doForget() {
    if (restSession()) {
      try {
        await api.logout();
      } catch { /* signed out either way */ }
      clearRestSession();
    }
    await forgetKey();
    ctx.key = null;
    ctx.flash("info", "The key was removed from this browser.");
    ctx.rerender();
  }

  const stored = ctx.key
    ? el("section", { class: "card", "data-test": "key-stored" },
      el("h2", {}, "Your key"),
      el("dl", {},
        el("dt", {}, "User"), el("dd", { "data-test": "key-stored-user" },
          oneLine(ctx.key.user, 64)),
        el("dt", {}, "Public key"), el("dd", { class: "mono", "data-test": "key-stored-public" },
          publicKeyText(ctx.key.publicKey))),
      el("p", { class: "hint" }, "The private key is kept in this browser as a key "
        + "that cannot be exported."),
      el("div", { class: "actions" },
        button("Forget this key", (ev) => busy(ev.target, doForget),
          { "data-test": "key-forget", class: "danger" }),
        restSession() ? null : el("a", { href: "#/signin", class: "button" }, "Sign in")))
    : null;

  show(target, el("div", { class: "stack" }, stored,
    el("section", { class: "card", "data-test": "key-form" },
      el("h1", {}, ctx.key ? "Import another key" : "Import your key"),
      el("p", {}, "Choose the private key file `ticrypt keygen` wrote (for example "
        + "~/.config/ticrypt/key). It is read in this page only; nothing leaves the browser."),
      el("div", { class: "form" },
        el("label", { for: "key-file" }, "Key file"), file,
        el("label", { for: "key-passphrase" }, "Passphrase (if the key has one)"), pass,
        el("label", { for: "key-user" }, "User name"), user),
      el("div", { class: "actions" }, importBtn),
      status)));
  return {};
}
