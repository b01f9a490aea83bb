// Sign in to rest: challenge, a login-v1 signature by the stored key, login.

import { signPurpose } from "./signed.js";
import { api, setRestSession } from "./rest.js";
import { publicKeyText } from "./view-key.js";
import { busy, button, el, notice, oneLine, show } from "./ui.js";

export async function signIn(key) {
  const ch = await api.challenge(key.user);
  const payload = { challenge: ch.challenge, challenge_id: ch.challenge_id, user: key.user };
  const signature = await signPurpose(key.privateKey, "login-v1", payload);
  const answer = await api.login(key.user, ch.challenge_id, signature);
  setRestSession({ token: answer.token, user: answer.user, role: answer.role,
    expires: answer.expires });
  return answer;
}

function explain(e, user) {
  if (e.code === "login-failed") {
    return `rest refused the sign-in as ${user}: is this key registered for that user, `
      + "and is the user enabled? (login-failed)";
  }
  if (e.code === "rate-limited") {
    return `Too many failed sign-ins from this machine; try again in ${e.retryAfter ?? "a few"}`
      + " seconds (rate-limited).";
  }
  if (e.code === "rest-unavailable") return `rest cannot be reached: ${e.human}`;
  return e.human || e.message;
}

export function signinView(target, ctx) {
  const status = el("div", { class: "status" });
  const key = ctx.key;
  const btn = button(`Sign in as ${oneLine(key.user, 64)}`, () => busy(btn, go),
    { "data-test": "signin", class: "primary" });

  async function go() {
    show(status, notice("progress", "Signing in…", { test: "signin-progress" }));
    try {
      await signIn(key);
    } catch (e) {
      return show(status, notice("error", explain(e, key.user),
        { test: "signin-error", code: e.code || "error" }));
    }
    ctx.signinReason = null;
    ctx.flash(null);
    ctx.go("#/vms");
  }

  show(target, el("section", { class: "card narrow", "data-test": "signin-view" },
    el("h1", {}, "Sign in"),
    ctx.signinReason ? notice("info", ctx.signinReason, { test: "signin-reason" }) : null,
    el("p", {}, "rest sends a challenge; your key signs it in this page."),
    el("dl", {},
      el("dt", {}, "User"), el("dd", {}, oneLine(key.user, 64)),
      el("dt", {}, "Key"), el("dd", { class: "mono" }, publicKeyText(key.publicKey))),
    el("div", { class: "actions" }, btn,
      el("a", { href: "#/key", "data-test": "signin-other-key" }, "Use another key")),
    status));
  return {};
}
