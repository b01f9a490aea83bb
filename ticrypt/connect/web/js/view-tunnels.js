// Tunnels: the VM's application ports on 127.0.0.1, held by ticrypt-connect.
// Opening follows the CLI (PROTOCOL.md §7 "The CLI's sequence"):
//   1. rest opens a pathway at the proxy (admits only this machine),
//   2. connect makes a client certificate (its key stays in connect),
//   3. the VM pins it over the secure channel (tunnel-accept): its ports
//      and its own certificate's fingerprint,
//   4. connect dials the pathway with "wait": true and listens locally.
// If a step after the first fails the pathway is closed again; closing a
// tunnel deletes it at connect, then its pathway at rest, unless another
// tunnel rides it.

import { closeTunnel, createCert, listTunnels, openTunnel } from "./connectapi.js";
import { api } from "./rest.js";
import { errorCode, errorText } from "./vmconn.js";
import { busy, button, el, notice, oneLine, show, size } from "./ui.js";

export const STEPS = {
  pathway: "1/4 rest opens a pathway at the proxy for this machine…",
  cert: "2/4 ticrypt-connect makes a client certificate…",
  accept: "3/4 the VM pins the certificate over the secure channel…",
  dial: "4/4 ticrypt-connect dials the tunnel…",
};

function failure(code, message) {
  return Object.assign(new Error(message), { code });
}

/** Close rest's pathway unless a tunnel of this connect rides it (best effort). */
export async function releasePathway(pathwayId) {
  let others = [];
  try {
    others = await listTunnels();
  } catch { /* connect gone: nothing rides it */ }
  if (others.some((t) => t.pathway === pathwayId && t.state !== "closed")) return "";
  try {
    await api.deletePathway(pathwayId);
  } catch (e) {
    return ` (its pathway stays open until it times out: ${errorText(e)})`;
  }
  return "";
}

/** The whole set-up for one VM: resolves with connect's TUNNEL. */
export async function openTunnelTo(vm, conn, progress) {
  progress(STEPS.pathway);
  let pathway;
  try {
    pathway = await api.createPathway(vm.id);
  } catch (e) {
    throw failure(errorCode(e), `rest refused the pathway: ${errorText(e)}`);
  }
  try {
    progress(STEPS.cert);
    const cert = await createCert();
    progress(STEPS.accept);
    const session = await conn.session();
    let grant;
    try {
      grant = await session.tunnelAccept(cert.cert);
    } catch (e) {
      throw failure(errorCode(e), `the VM refused the certificate: ${errorText(e)}`);
    }
    const ports = (grant.ports || []).filter((p) => Number.isInteger(p));
    if (typeof grant.tls_fingerprint !== "string") {
      throw failure("bad-answer", "the VM answered tunnel-accept without its tls_fingerprint");
    }
    if (!ports.length) throw failure("no-ports", `${vm.name || vm.id} tunnels no ports`);
    progress(STEPS.dial);
    try {
      return await openTunnel({
        vm: vm.id, name: vm.name || vm.id, proxy_host: String(pathway.proxy_host),
        proxy_port: Number(pathway.port), cert: cert.id, fingerprint: grant.tls_fingerprint,
        forwards: [...ports].sort((a, b) => a - b).map((p) => ({ remote: p, local: 0 })),
        pathway: String(pathway.id) });
    } catch (e) {
      const code = errorCode(e);
      throw failure(code, code === "tunnel-failed"
        ? `the tunnel was refused: ${errorText(e)}` : `ticrypt-connect refused: ${errorText(e)}`);
    }
  } catch (e) {
    await releasePathway(String(pathway.id));
    throw e;
  }
}

/** How often a shown tunnel table asks connect again (state, streams, bytes). */
export const REFRESH_MS = 2000;

function stateCell(t) {
  return [el("span", { class: `state state-${t.state === "up" ? "ok" : "off"}`,
    "data-test": "tunnel-state" }, oneLine(t.state, 16)),
  t.last_error && t.state !== "up" ? el("div", { class: "hint" }, oneLine(t.last_error, 200))
    : null];
}

function forwardsKey(t) {
  return (t.forwards || []).map((f) => `${Number(f.local)}>${Number(f.remote)}`).join(",");
}

function tunnelRow(t, onClose) {
  const forwards = (t.forwards || []).map((f) => {
    const url = `http://127.0.0.1:${Number(f.local)}/`;
    return el("li", {},
      el("a", { href: url, target: "_blank", rel: "noopener noreferrer", "data-test": "tunnel-link",
        "data-remote": String(Number(f.remote)), "data-local": String(Number(f.local)) },
      `127.0.0.1:${Number(f.local)}`), ` → VM port ${Number(f.remote)}`);
  });
  const row = el("tr", { "data-test": "tunnel-row", "data-tunnel-id": oneLine(t.id, 32),
    "data-state": oneLine(t.state, 16), "data-vm": oneLine(t.vm, 32),
    "data-forwards": forwardsKey(t) },
  el("td", { class: "mono" }, oneLine(t.id, 32)),
  el("td", {}, oneLine(t.name || t.vm, 64)),
  el("td", { "data-cell": "state" }, ...stateCell(t)),
  el("td", {}, el("ul", { class: "plain" }, forwards)),
  el("td", { "data-test": "tunnel-streams" }, String(Number(t.streams) || 0)),
  el("td", { "data-test": "tunnel-bytes-in" }, size(t.bytes_in)),
  el("td", { "data-test": "tunnel-bytes-out" }, size(t.bytes_out)),
  el("td", {}, button("Close", (ev) => busy(ev.target, () => onClose(t)),
    { "data-test": "tunnel-close", "data-tunnel-id": oneLine(t.id, 32), class: "danger small" })));
  return row;
}

/**
 * Bring `row` up to date with `t` in place (state, streams, bytes): the
 * row's links and its Close button stay the same elements, so a refresh
 * never pulls them from under a click.
 */
function updateRow(row, t) {
  const state = oneLine(t.state, 16);
  if (row.getAttribute("data-state") !== state) {
    row.setAttribute("data-state", state);
    show(row.querySelector("[data-cell=state]"), ...stateCell(t));
  }
  const texts = [["tunnel-streams", String(Number(t.streams) || 0)],
    ["tunnel-bytes-in", size(t.bytes_in)], ["tunnel-bytes-out", size(t.bytes_out)]];
  for (const [test, text] of texts) {
    const cell = row.querySelector(`[data-test=${test}]`);
    if (cell.textContent !== text) cell.textContent = text;
  }
}

/** The tunnel table (all, or one VM's) with refresh and close; open if vm+conn. */
export function tunnelsPanel(ctx, { vm = null, conn = null } = {}) {
  const table = el("div", { "data-test": "tunnel-box" });
  const status = el("div", { class: "status", "data-test": "tunnel-status" });
  const refresh = button("Refresh", (ev) => busy(ev.target, () => load(true)),
    { "data-test": "tunnel-refresh", class: "secondary" });
  const open = vm && conn ? button("Open tunnel", (ev) => busy(ev.target, doOpen),
    { "data-test": "tunnel-open", class: "primary" }) : null;
  const node = el("div", { class: "panel", "data-test": "tunnel-panel",
    "data-auto-refresh": "off" },
    el("div", { class: "title-row" }, el("h2", {}, vm ? "Tunnels to this VM" : "Tunnels"),
      el("div", { class: "actions" }, open, refresh)),
    vm ? el("p", { class: "hint" }, "Opening a tunnel forwards every port the VM offers to a "
      + "port of this machine (127.0.0.1).") : null,
    status, table);
  let loaded = false;
  let alive = true;
  let shown = false;
  let timer = null;     // the next automatic refresh while shown
  let loading = null;   // the load under way (one at a time)
  let tbody = null;     // the rendered table's body, rows by tunnel id
  const rows = new Map();

  function render(tunnels) {
    if (!tunnels.length) {
      tbody = null;
      rows.clear();
      show(table, el("p", { "data-test": "tunnel-empty" }, "No tunnels."));
      return;
    }
    const ids = new Set(tunnels.map((t) => String(t.id)));
    const same = tbody !== null && tbody.isConnected && ids.size === rows.size
      && tunnels.every((t) => rows.has(String(t.id))
        && rows.get(String(t.id)).getAttribute("data-forwards") === forwardsKey(t));
    if (same) {
      for (const t of tunnels) updateRow(rows.get(String(t.id)), t);
      return;
    }
    rows.clear();
    tbody = el("tbody", {}, tunnels.map((t) => {
      const row = tunnelRow(t, doClose);
      rows.set(String(t.id), row);
      return row;
    }));
    show(table, el("table", { class: "list", "data-test": "tunnel-list" },
      el("thead", {}, el("tr", {}, ...["Id", "VM", "State", "Local ports", "Streams", "In",
        "Out", ""].map((h) => el("th", {}, h)))),
      tbody));
  }

  /** One listing at a time; `fresh`: one that starts after this call (after a change). */
  function load(fresh = false) {
    if (loading && fresh) return loading.then(() => load());
    if (!loading) loading = fetchAndRender().finally(() => { loading = null; });
    return loading;
  }

  async function fetchAndRender() {
    let tunnels;
    try {
      tunnels = await listTunnels();
    } catch (e) {
      if (alive) {
        tbody = null;
        rows.clear();
        show(table, notice("error", `ticrypt-connect did not list its tunnels: `
          + `${errorText(e)}`, { test: "tunnel-error", code: errorCode(e) }));
      }
      return;
    }
    if (!alive) return;
    loaded = true;
    if (vm) tunnels = tunnels.filter((t) => t.vm === vm.id);
    render(tunnels);
  }

  // While the table is shown it refreshes itself every REFRESH_MS (the
  // next refresh is planned when one ends, so slow answers never pile up);
  // hidden or left, the timer stops.
  function schedule() {
    clearTimeout(timer);
    timer = alive && shown ? setTimeout(tick, REFRESH_MS) : null;
    node.setAttribute("data-auto-refresh", timer !== null ? "on" : "off");
  }

  async function tick() {
    timer = null;
    await load();
    schedule();
  }

  async function doOpen() {
    try {
      const t = await openTunnelTo(vm, conn, (step) => show(status,
        notice("progress", step, { test: "tunnel-progress" })));
      const ports = (t.forwards || []).map((f) => `127.0.0.1:${f.local} → ${f.remote}`).join(", ");
      show(status, notice("ok", `Tunnel ${oneLine(t.id, 32)} is ${oneLine(t.state, 16)}: ${ports}`,
        { test: "tunnel-opened" }));
    } catch (e) {
      show(status, notice("error", errorText(e), { test: "tunnel-error", code: errorCode(e) }));
    }
    await load(true);
  }

  async function doClose(t) {
    try {
      const closed = await closeTunnel(t.id);
      const note = typeof closed.pathway === "string" ? await releasePathway(closed.pathway) : "";
      show(status, notice("ok", `Closed tunnel ${oneLine(t.id, 32)}${note}`,
        { test: "tunnel-closed" }));
    } catch (e) {
      show(status, notice("error", `Cannot close ${oneLine(t.id, 32)}: ${errorText(e)}`,
        { test: "tunnel-error", code: errorCode(e) }));
    }
    await load(true);
  }

  return {
    node,
    show() {
      node.hidden = false;
      shown = true;
      if (!loaded) load();
      schedule();
    },
    hide() {
      node.hidden = true;
      shown = false;
      schedule();
    },
    dispose() {
      alive = false;
      shown = false;
      schedule();
    },
  };
}

/** #/tunnels: every tunnel of this ticrypt-connect. */
export function tunnelsView(target, ctx) {
  const panel = tunnelsPanel(ctx);
  show(target, el("section", { class: "card", "data-test": "tunnels-view" }, panel.node));
  panel.show();
  return { dispose: () => panel.dispose() };
}
