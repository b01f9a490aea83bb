// The page's entry: the page session from the #link fragment, the stored
// key, the rest session, and a small hash router over the views.
//
//   #/key                  import or forget the key
//   #/signin               sign in (challenge, login-v1 signature)
//   #/vms                  the VMs rest shows, and "open a VM by id"
//   #/vm/ID[/TAB]          one VM: terminal | exec | users | tunnels
//   #/tunnels              every tunnel of this ticrypt-connect
//   #/allowlist            the license-server allow-list (superadmins)

import { onPageLost, openPageSession, pageToken, takeLink } from "./connectapi.js";
import { loadKey } from "./keystore.js";
import { api, clearRestSession, onSessionLost, restSession, watchSessionExpiry } from "./rest.js";
import { button, el, notice, oneLine, show } from "./ui.js";
import { allowlistView } from "./view-allowlist.js";
import { keyView } from "./view-key.js";
import { signinView } from "./view-signin.js";
import { tunnelsView } from "./view-tunnels.js";
import { vmView } from "./view-vm.js";
import { vmsView } from "./view-vms.js";

const main = document.getElementById("main");
const header = document.getElementById("header");
const flashBox = document.getElementById("flash");

/** What every view may use. */
const ctx = {
  key: null,            // {user, privateKey, publicKey} from the key store
  signinReason: null,   // why the page is back at sign-in (a human line)
  pageProblem: null,    // why there is no page session
  pageProblemCode: null,
  go(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  },
  flash(kind, text) {
    show(flashBox, text ? notice(kind, text, { test: "flash" }) : []);
  },
  session: restSession,
  refreshHeader: () => renderHeader(),
  rerender: () => route(),
};

let current = null;  // {name, arg, view: {dispose?, update?}}

function disposeCurrent() {
  if (current && current.view && current.view.dispose) current.view.dispose();
  current = null;
}

function parseHash() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean)
    .map((p) => decodeURIComponent(p));
  return { name: parts[0] || "", args: parts.slice(1) };
}

function renderHeader() {
  const session = restSession();
  const nav = [];
  if (pageToken() && session) {
    nav.push(el("a", { href: "#/vms", "data-test": "nav-vms" }, "VMs"),
      el("a", { href: "#/tunnels", "data-test": "nav-tunnels" }, "Tunnels"));
    if (session.role === "superadmin") {
      nav.push(el("a", { href: "#/allowlist", "data-test": "nav-allowlist" }, "Allow-list"));
    }
  }
  if (pageToken()) nav.push(el("a", { href: "#/key", "data-test": "nav-key" }, "Key"));
  const who = session
    ? [el("span", { class: "whoami", "data-test": "whoami" },
      `${oneLine(session.user, 64)} (${oneLine(session.role, 16)})`),
    button("Sign out", signOut, { "data-test": "signout", class: "secondary" })]
    : [];
  show(header, el("a", { class: "brand", href: "#/vms" }, "ticrypt"),
    el("nav", {}, ...nav), el("div", { class: "who" }, ...who));
}

async function signOut() {
  try {
    await api.logout();
  } catch { /* the session may be dead already: signed out either way */ }
  clearRestSession();
  ctx.signinReason = "You signed out.";
  ctx.go("#/signin");
}

function pageSessionView(target) {
  show(target, el("section", { class: "card", "data-test": "page-session" },
    el("h1", {}, "Open the page from ticrypt-connect"),
    ctx.pageProblem ? notice("error", ctx.pageProblem,
      { test: "page-problem", code: ctx.pageProblemCode }) : null,
    el("p", {}, "This page works only through the one-time link ticrypt-connect prints "
      + "(http://127.0.0.1:PORT/#link=...). Get a new one with:"),
    el("pre", { class: "command" }, "ticrypt open")));
  return {};
}

function route() {
  const { name, args } = parseHash();
  if (current && current.name === "vm" && name === "vm" && current.arg === args[0]
      && pageToken() && restSession() && current.view.setTab) {
    current.view.setTab(args[1] || "terminal");  // same VM: keep its session
    return;
  }
  disposeCurrent();
  renderHeader();
  let view;
  if (!pageToken()) {
    view = pageSessionView(main);
  } else if (!ctx.key || name === "key") {
    view = keyView(main, ctx);
  } else if (!restSession() || name === "signin") {
    view = signinView(main, ctx);
  } else if (name === "vm" && args[0]) {
    view = vmView(main, ctx, args[0], args[1] || "terminal");
  } else if (name === "tunnels") {
    view = tunnelsView(main, ctx);
  } else if (name === "allowlist") {
    view = allowlistView(main, ctx);
  } else {
    view = vmsView(main, ctx);
  }
  current = { name, arg: args[0], view };
}

onPageLost((error) => {
  ctx.pageProblemCode = error.code;
  ctx.pageProblem = `ticrypt-connect no longer knows this page (${error.code}): it was `
    + "restarted or the page session ended. Open the link again (run: ticrypt open).";
  route();
});

onSessionLost((error) => {
  ctx.signinReason = `Your session ended: ${error.human}. Sign in again.`;
  if (!location.hash.startsWith("#/signin")) ctx.go("#/signin");
  else route();
});

/** Redeem the #link=... of the address bar, if any (at load, or pasted into an open tab). */
async function redeemLink() {
  const link = takeLink();
  if (link === null) return;
  try {
    await openPageSession(link);
    ctx.pageProblem = null;
    ctx.pageProblemCode = null;
    ctx.flash(null);
  } catch (e) {
    ctx.pageProblemCode = e.code;
    ctx.pageProblem = e.code === "bad-link"
      ? "This link was already used or has expired. Run `ticrypt open` for a new one."
      : `ticrypt-connect refused the link: ${e.human || e.message}`;
    // this tab still has a page session of an earlier link: say so, go on with it
    if (pageToken()) ctx.flash("error", ctx.pageProblem);
  }
}

async function onHashChange() {
  // a new link in a tab already showing the page is a same-document
  // navigation (no reload): redeem it here as boot() does
  if (location.hash.startsWith("#link=")) await redeemLink();
  route();
}

async function boot() {
  await redeemLink();
  watchSessionExpiry();
  try {
    ctx.key = await loadKey();
  } catch (e) {
    ctx.key = null;
    ctx.flash("error", `The browser's key store cannot be read: ${e.message}`);
  }
  window.addEventListener("hashchange", onHashChange);
  route();
  document.body.setAttribute("data-ready", "yes");
}

boot();
