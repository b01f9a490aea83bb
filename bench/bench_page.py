"""Benchmark the browser page's exec against the ``ticrypt`` CLI (not a test).

    .venv/bin/python bench/bench_page.py [--quick] [--runs N] [--size MiB]

In a temp folder it builds one deployment (:class:`ticrypt.lab.deploy.Deployment`):
ticrypt-proxy, ticrypt-rest, one ticrypt-vmc (the "VM") and the user's
ticrypt-connect serving the page, all real ``twistd -n`` daemons on
127.0.0.1; the CLI is signed in with ``ticrypt login``.  One headless
Chromium (selenium, ``/usr/bin/chromium`` and ``/usr/bin/chromedriver``)
opens the page's one-time link, imports the user's key and signs in to rest
through connect, as the page does.  Then, alternating page and CLI
(A B A B ...), ``--runs`` times each, medians reported:

* **stdout**: ``head -c SIZE /dev/zero``.  Page: a fresh ticket
  (``/rest/v1/vms/ID/ticket``), ``openVmSession`` through connect's relay,
  ``exec`` counting the bytes given to ``onStdout``, timed with
  ``performance.now()`` in the page: ``stream`` from ``exec()`` to its exit
  status, ``total`` from the ticket request.  CLI: wall time of ``ticrypt
  exec VM -- head -c SIZE /dev/zero`` (stdout to /dev/null; its process
  start, ticket, channel to the proxy directly, no connect relay).
* **ready + true**: page: ticket + session ready (``ready``) and then one
  ``exec(["true"])`` to its status (``total``); CLI: wall time of ``ticrypt
  exec VM -- true`` (includes the Python process start; ``ticrypt -h`` is timed too, the
  start alone).

The reference is the CLI.  Prints one JSON line per measurement and a
markdown table.  ``--quick``: 1 run each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer, task, threads  # noqa: E402

from ticrypt.lab import daemons  # noqa: E402
from ticrypt.vmc.processes import descendants, proc_info, scan_proc  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_exec import USER, emit, proc_cpu  # noqa: E402
from bench_exec import Lab as ExecLab  # noqa: E402

MiB = 1024 * 1024
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# as test/browser.py (a benchmark shares no code with the test suite)
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900")


# -- the browser ------------------------------------------------------------------------


class Chromium:
    """One headless Chromium under the chromedriver this object starts (blocking calls)."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="bench-page-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        self.service = Service(executable_path=CHROMEDRIVER)
        self.driver: Any = None
        try:
            self.driver = webdriver.Chrome(service=self.service, options=options)
        except BaseException:
            self.stop()
            raise
        self.driver.set_script_timeout(600)

    def cpu(self) -> float:
        """CPU seconds of every live process below our chromedriver (the browser)."""
        proc = getattr(self.service, "process", None)
        if proc is None:
            return 0.0
        table = scan_proc() or {}
        return sum(proc_cpu(p, reaped=False) for p in descendants({proc.pid}, table) - {proc.pid})

    def run_async(self, js: str, *args: Any) -> Any:
        return self.driver.execute_async_script(js, *args)

    def stop(self) -> None:
        """Quit the browser and our chromedriver; kill what they left below it."""
        proc = getattr(self.service, "process", None)
        below: list[tuple[int, int]] = []
        if proc is not None:
            table = scan_proc() or {}
            below = [(p, table[p].start) for p in descendants({proc.pid}, table) - {proc.pid}]
        if self.driver is not None:
            try:
                self.driver.quit()
            except Exception:
                pass
        try:
            self.service.stop()
        except Exception:
            pass
        for pid, start in below:
            info = proc_info(pid)
            if info is not None and info.start == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(self.profile, ignore_errors=True)


# Every script gets the same prologue: the page's own modules, dynamically
# imported from connect (script-src 'self').
_SIGN_IN = """
const [pem, user, done] = arguments;
(async () => {
  const { importKeyFile } = await import("/app/js/keyfile.js");
  const { signPurpose } = await import("/app/js/signed.js");
  const { api, setRestSession } = await import("/app/js/rest.js");
  const key = await importKeyFile(pem, "");
  window.benchKey = key;
  const ch = await api.challenge(user);
  const payload = { challenge: ch.challenge, challenge_id: ch.challenge_id, user };
  const signature = await signPurpose(key.privateKey, "login-v1", payload);
  const answer = await api.login(user, ch.challenge_id, signature);
  setRestSession({ token: answer.token, user: answer.user, role: answer.role,
                   expires: answer.expires });
  return { role: answer.role };
})().then(done, (e) => done({ error: String(e && e.message || e) }));
"""

_RUN = """
const [vmId, argv, done] = arguments;
(async () => {
  const { openVmSession } = await import("/app/js/session.js");
  const { pageToken } = await import("/app/js/connectapi.js");
  const { api } = await import("/app/js/rest.js");
  const { vmKeyBytes } = await import("/app/js/vmconn.js");
  const t0 = performance.now();
  const t = await api.ticket(vmId);
  const session = await openVmSession({
    pageToken: pageToken(), ticket: t.ticket, vmId, vmKey: vmKeyBytes(t.vm_public_key),
    key: window.benchKey, timeout: 60000, requestTimeout: 600000 });
  const t1 = performance.now();
  let bytes = 0;
  const cmd = session.exec(argv, { onStdout: (b) => { bytes += b.length; } });
  const status = await cmd.done;
  const t2 = performance.now();
  await session.close();
  return { status, bytes, ready_s: (t1 - t0) / 1000, stream_s: (t2 - t1) / 1000,
           total_s: (t2 - t0) / 1000 };
})().then(done, (e) => done({ error: String(e && e.message || e) }));
"""


# -- the deployment ---------------------------------------------------------------------


class Lab(ExecLab):
    """proxy, rest, one vmc and connect (page on) under twistd; the CLI logged in."""

    def __init__(self, reactor: Any, folder: str):
        super().__init__(reactor, folder, comment="bench_page")

    async def start_more(self) -> None:
        await self.dep.start_connect(self._start)

    def page_link(self) -> str:
        """A one-time URL of the page (POST /v1/page/link with the token file's token)."""
        import urllib.request

        with open(self.dep.path("connect-state/api.token")) as f:
            token = f.read().strip()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.dep.addresses.connect_port}/v1/page/link", data=b"{}",
            method="POST", headers={"Authorization": "Bearer " + token,
                                    "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return str(json.loads(r.read())["url"])


# -- the measurements (in a thread: the reactor keeps the daemons' pipes drained) ---------


def daemon_cpu(lab: Lab) -> dict[str, float]:
    return {name: proc_cpu(pid) for name, pid in lab.by_role.items() if name != "rest"}


def page_run(browser: Chromium, lab: Lab, argv: list[str]) -> dict[str, Any]:
    before = {**daemon_cpu(lab), "browser": browser.cpu()}
    r = browser.run_async(_RUN, lab.vm_id, argv)
    if "error" in r or r["status"] != 0:
        raise RuntimeError(f"page exec {argv}: {r}")
    after = {**daemon_cpu(lab), "browser": browser.cpu()}
    r["cpu_s"] = {k: round(after[k] - before[k], 2) for k in before}
    return dict(r)


def cli_run(lab: Lab, argv: list[str]) -> tuple[float, dict[str, float]]:
    """Wall time and CPU seconds per process (client from wait4) of ``ticrypt exec``."""
    before = daemon_cpu(lab)
    t0 = time.perf_counter()
    proc = subprocess.Popen([daemons.script_path("ticrypt"), "exec", lab.vm_id, "--", *argv],
                            env=lab.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"ticrypt exec {argv}: {proc.returncode} {err[-300:]!r}")
    after = daemon_cpu(lab)
    cpu = {k: round(after[k] - before[k], 2) for k in before}
    cpu["client"] = round(usage.ru_utime + usage.ru_stime, 2)
    return wall, cpu


def cli_start(lab: Lab) -> float:
    """Wall time of ``ticrypt -h``: the CLI's process start and imports, no network."""
    t0 = time.perf_counter()
    subprocess.run([daemons.script_path("ticrypt"), "-h"], env=lab.env, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=True)
    return time.perf_counter() - t0


def measure(browser: Chromium, lab: Lab, opts: argparse.Namespace) -> list[dict[str, Any]]:
    size = opts.size * MiB
    head = ["head", "-c", str(size), "/dev/zero"]
    bulk: dict[str, list[float]] = {"page_stream": [], "page_total": [], "cli": []}
    true: dict[str, list[float]] = {"page_ready": [], "page_total": [], "cli": [],
                                    "cli_start": []}
    cpu_page: list[dict[str, float]] = []
    cpu_cli: list[dict[str, float]] = []
    for i in range(opts.runs):
        r = page_run(browser, lab, head)
        if r["bytes"] != size:
            raise RuntimeError(f"page got {r['bytes']} bytes of {size}")
        emit({"bench": "stdout", "path": "page", "run": i, "bytes": size, **r,
              "MB_per_s_stream": round(size / r["stream_s"] / 1e6, 1),
              "MB_per_s_total": round(size / r["total_s"] / 1e6, 1)})
        bulk["page_stream"].append(r["stream_s"])
        bulk["page_total"].append(r["total_s"])
        cpu_page.append(r["cpu_s"])
        wall, cpu = cli_run(lab, head)
        emit({"bench": "stdout", "path": "cli", "run": i, "bytes": size, "seconds": wall,
              "MB_per_s": round(size / wall / 1e6, 1), "cpu_s": cpu})
        cpu_cli.append(cpu)
        bulk["cli"].append(wall)
    for i in range(opts.runs):
        r = page_run(browser, lab, ["true"])
        emit({"bench": "true", "path": "page", "run": i, **r})
        true["page_ready"].append(r["ready_s"])
        true["page_total"].append(r["total_s"])
        wall, _ = cli_run(lab, ["true"])
        emit({"bench": "true", "path": "cli", "run": i, "seconds": wall})
        true["cli"].append(wall)
        start = cli_start(lab)
        emit({"bench": "cli-start", "path": "cli", "run": i, "seconds": start})
        true["cli_start"].append(start)
    mb = {k: size / statistics.median(v) / 1e6 for k, v in bulk.items()}
    t = {k: statistics.median(v) for k, v in true.items()}
    summary = [
        {"what": f"exec stdout {opts.size} MiB, MB/s, page stream (exec to exit)",
         "page": round(mb["page_stream"], 1), "cli": round(mb["cli"], 1),
         "ratio": round(mb["page_stream"] / mb["cli"], 2)},
        {"what": f"exec stdout {opts.size} MiB, MB/s, page total (ticket, channel, exec)",
         "page": round(mb["page_total"], 1), "cli": round(mb["cli"], 1),
         "ratio": round(mb["page_total"] / mb["cli"], 2)},
        {"what": f"exec stdout {opts.size} MiB, MB/s, page stream vs CLI wall minus its "
                 "`exec -- true` median (estimate)",
         "page": round(mb["page_stream"], 1),
         "cli": round(size / max(statistics.median(bulk["cli"]) - t["cli"], 1e-3) / 1e6, 1),
         "ratio": round(mb["page_stream"] * (statistics.median(bulk["cli"]) - t["cli"])
                        / (size / 1e6), 2)},
        {"what": "ticket + ready channel, s (page) vs `exec -- true` wall, s (CLI)",
         "page": round(t["page_ready"], 3), "cli": round(t["cli"], 3),
         "ratio": round(t["page_ready"] / t["cli"], 2)},
        {"what": "ticket + ready channel + `true`, s (page) vs `exec -- true` wall, s (CLI)",
         "page": round(t["page_total"], 3), "cli": round(t["cli"], 3),
         "ratio": round(t["page_total"] / t["cli"], 2)},
        {"what": "CLI process start alone (`ticrypt -h`), s", "page": "-",
         "cli": round(t["cli_start"], 3), "ratio": "-"},
    ]
    gb = size / 1e9
    for label, runs in (("page", cpu_page), ("CLI", cpu_cli)):
        per = {k: statistics.median(r[k] for r in runs) / gb for k in runs[0]}
        summary.append({"what": f"exec stdout CPU-s per GB, {label}: " + ", ".join(
            f"{k} {v:.1f}" for k, v in per.items()),
            "page": round(sum(per.values()), 1) if label == "page" else "-",
            "cli": round(sum(per.values()), 1) if label == "CLI" else "-", "ratio": "-"})
    for row in summary:
        emit({"bench": "summary", **row})
    return summary


def print_table(summary: list[dict[str, Any]], runs: int, load: tuple[float, float]) -> None:
    print(f"\nmedians of {runs}; load average {load[0]:.2f} before, {load[1]:.2f} after; "
          f"{os.cpu_count()} CPUs, {platform.python_implementation()} "
          f"{platform.python_version()}\n")
    print("| what | page | CLI (reference) | page / CLI |\n|---|---|---|---|")
    for r in summary:
        print(f"| {r['what']} | {r['page']} | {r['cli']} | {r['ratio']} |")
    sys.stdout.flush()


async def bench_main(reactor: Any, opts: argparse.Namespace) -> None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            raise SystemExit(f"bench_page: {path} missing (apt-get install chromium "
                             "chromium-driver)")
    folder = tempfile.mkdtemp(prefix="bench-page-")
    lab = Lab(reactor, folder)
    browser: Chromium | None = None
    try:
        await lab.start()
        browser = await threads.deferToThread(Chromium)
        url = await threads.deferToThread(lab.page_link)

        def open_page() -> Any:
            assert browser is not None
            browser.driver.get(url)
            from selenium.webdriver.support.ui import WebDriverWait
            WebDriverWait(browser.driver, 30).until(
                lambda d: d.execute_script("return document.body.hasAttribute('data-ready')"))
            with open(lab.dep.path(f"{USER}.key")) as f:
                return browser.run_async(_SIGN_IN, f.read(), USER)
        signed = await threads.deferToThread(open_page)
        if "error" in signed:
            raise RuntimeError(f"page sign-in: {signed['error']}")
        emit({"bench": "setup", "vm": lab.vm_id, "connect_port":
              lab.dep.addresses.connect_port, "page": signed})
        load0 = os.getloadavg()[0]
        summary = await threads.deferToThread(measure, browser, lab, opts)
        print_table(summary, opts.runs, (load0, os.getloadavg()[0]))
    finally:
        if browser is not None:
            await threads.deferToThread(browser.stop)
        await lab.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 run each")
    parser.add_argument("--runs", type=int, default=None, help="runs per path (default 3)")
    parser.add_argument("--size", type=int, default=64, help="MiB of stdout (default 64)")
    opts = parser.parse_args()
    opts.runs = opts.runs or (1 if opts.quick else 3)
    task.react(lambda r: defer.ensureDeferred(bench_main(r, opts)))


if __name__ == "__main__":
    main()
