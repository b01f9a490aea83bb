"""Screenshots of the page's main views for the README, against a real
deployment (the one of test/test_web_e2e.py: every role a ``twistd``
process on 127.0.0.1) in headless Chromium::

    PYTHONPATH=. .venv/bin/python tools/screenshots.py [--out doc/screenshots]

Writes signin.png, vms.png, terminal.png, exec.png and tunnels.png (1200x760
PNGs).  Needs chromium, chromedriver and selenium (the dev extras) and the
page's npm dependencies (``npm ci`` in ticrypt/connect/web).  The working
folder (keys, configs, logs) is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task

from test.browser import Browser, chromium_skip_reason
from test.test_web_e2e import ROWS, Page
from test.webchain import OWNER, VM, start_web_chain
from ticrypt.lab import daemons

NAMES = ("signin", "vms", "terminal", "exec", "tunnels")


async def shoot(reactor: Any, out: str) -> None:
    workdir = tempfile.mkdtemp(prefix="ticrypt-screens-")
    cleanups: list[Callable[[], Any]] = []
    procs: list[daemons.Daemon] = []

    async def start(plugin: str, config: str) -> daemons.Daemon:
        proc = daemons.spawn(reactor, plugin, config, timeout=60, cwd=daemons.ROOT)
        procs.append(proc)
        await proc.ready
        return proc

    browser = Browser()
    try:
        chain = await start_web_chain(reactor, os.path.join(workdir, "dep"),
                                      daemons.runner(reactor, cwd=daemons.ROOT), start,
                                      cleanups.append)
        await browser.start()
        await browser.call(browser.driver.set_window_size, 1200, 760)
        page = Page(browser)
        await page.open(await chain.page_link())
        await page.import_key(chain.key_file(OWNER), OWNER)
        await browser.screenshot(os.path.join(out, "signin.png"))
        await page.sign_in()
        await browser.screenshot(os.path.join(out, "vms.png"))

        await page.click(f"[data-test=vm-row][data-vm-name={VM}] [data-test=vm-link]")
        await page.wait("[data-test=terminal-state][data-state=running]", 45)
        await page.keys("clear; uname -sr; id; ls --color=always -F /usr; "
                        "printf '\\033[1;32mhello from the VM\\033[0m over the secure "
                        "channel\\n'\n")
        await page.until(ROWS, "hello from the VM over")
        await browser.screenshot(os.path.join(out, "terminal.png"))

        await page.click("[data-test=tab-exec]")
        await page.fill("[data-test=exec-command]",
                        "echo building...; ls /etc | head -5; echo 'warning: demo' >&2; exit 3")
        await page.click("[data-test=exec-run]")
        await page.wait("[data-test=exec-status][data-state=exited]", 45)
        await browser.screenshot(os.path.join(out, "exec.png"))

        await page.click("[data-test=tab-tunnels]")
        await page.click("[data-test=tunnel-open]")
        await page.wait("[data-test=tunnel-opened]", 90)
        await browser.screenshot(os.path.join(out, "tunnels.png"))
    finally:
        browser.stop()
        for fn in reversed(cleanups):
            await defer.maybeDeferred(fn)
        for proc in reversed(procs):
            await proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(daemons.ROOT, "doc", "screenshots"))
    args = parser.parse_args()
    why = chromium_skip_reason()
    if why:
        sys.exit(f"screenshots: {why}")
    os.makedirs(args.out, exist_ok=True)
    task.react(lambda reactor: defer.ensureDeferred(shoot(reactor, args.out)))


if __name__ == "__main__":
    main()
