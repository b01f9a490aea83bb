"""Headless Chromium for the browser tests (the page served by connect).

:class:`Browser` wraps selenium's Chrome driver on the Debian packages
``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (given explicitly, so
Selenium Manager never downloads anything).  Every blocking driver call runs
in a thread (:func:`twisted.internet.threads.deferToThread`), so a Twisted
server in the same process keeps serving the page while a test awaits::

    reason = chromium_skip_reason()          # at class level: skip = reason

    b = await start_browser(self)            # stopped in cleanup
    await b.get(url)
    result = await b.run_async("const done = arguments[arguments.length - 1]; ...")

Tests skip with :func:`chromium_skip_reason` (one line) only when chromium,
chromedriver or selenium is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ticrypt.vmc.processes import descendants, proc_info, scan_proc

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900")

__all__ = ["CHROMEDRIVER", "CHROMIUM", "Browser", "chromium_skip_reason", "start_browser"]


def chromium_skip_reason() -> str | None:
    """None when the browser tests can run, else the one-line reason to skip."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} missing (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium missing (pip install -e '.[dev]')"
    return None


def _proc_start(pid: int) -> int | None:
    """The start time of ``pid`` (pids are reused, start times are not), None if gone."""
    info = proc_info(pid)
    return None if info is None else info.start


def _descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live process below ``root``."""
    table = scan_proc() or {}
    return [(pid, table[pid].start) for pid in descendants({root}, table) - {root}]


class Browser:
    """One headless Chromium driven by chromedriver; blocking calls in threads.

    ``await start()`` launches it (``get`` starts it too if needed); ``stop()``
    quits the browser, stops the chromedriver this object started and kills
    what it left behind (only processes started below that chromedriver),
    then removes the fresh profile folder.
    """

    def __init__(self, script_timeout: float = 60.0) -> None:
        self.script_timeout = script_timeout
        self.driver: Any = None
        self._service: Any = None
        self._profile: str | None = None
        self._children: list[tuple[int, str]] = []

    # -- lifecycle ---------------------------------------------------------

    def _start_blocking(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self._profile = tempfile.mkdtemp(prefix="ticrypt-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self._profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self._service = Service(executable_path=CHROMEDRIVER)
        self.driver = webdriver.Chrome(service=self._service, options=options)
        self.driver.set_window_size(1280, 900)
        self.driver.set_script_timeout(self.script_timeout)

    async def start(self) -> Browser:
        """Launch chromium (no-op when already running)."""
        if self.driver is None:
            await deferToThread(self._start_blocking)
        return self

    def stop(self) -> None:
        """Quit the browser and the chromedriver this object started.

        Synchronous (for ``addCleanup``); nothing the page talks to needs to
        keep serving while the browser quits."""
        driver, service, self.driver = self.driver, self._service, None
        proc = getattr(service, "process", None) if service is not None else None
        below = _descendants(proc.pid) if proc is not None else []
        if driver is not None:
            try:
                driver.quit()
            except Exception:
                pass
        if service is not None:
            try:
                service.stop()
            except Exception:
                pass
        for pid, start in below:
            if _proc_start(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    # -- page --------------------------------------------------------------

    async def get(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        await self.start()
        await deferToThread(self.driver.get, url)

    async def run(self, js: str, *args: Any) -> Any:
        """``execute_script``: the value ``js`` returns (JSON-like)."""
        return await deferToThread(self.driver.execute_script, js, *args)

    async def run_async(self, js: str, *args: Any) -> Any:
        """``execute_async_script``: ``js`` calls ``arguments[arguments.length-1](value)``.

        A script that never calls back fails after ``script_timeout`` seconds."""
        return await deferToThread(self.driver.execute_async_script, js, *args)

    async def wait_for(self, css: str, timeout: float = 10.0) -> Any:
        """Wait until an element matching ``css`` is displayed; the element."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        def wait() -> Any:
            return WebDriverWait(self.driver, timeout).until(
                expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, css)))
        return await deferToThread(wait)

    async def click(self, css: str) -> None:
        """Click the first element matching ``css``."""
        from selenium.webdriver.common.by import By
        await deferToThread(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def type(self, css: str, text: str) -> None:
        """Type ``text`` into the first element matching ``css``."""
        from selenium.webdriver.common.by import By
        await deferToThread(lambda: self.driver.find_element(By.CSS_SELECTOR, css).send_keys(text))

    async def screenshot(self, path: str) -> None:
        """Save a PNG of the window to ``path``."""
        def shoot() -> None:
            if not self.driver.save_screenshot(path):
                raise OSError(f"screenshot to {path} failed")
        await deferToThread(shoot)

    async def logs(self, level: str = "SEVERE") -> list[str]:
        """Console messages at ``level`` (default errors) since the last call."""
        entries = await deferToThread(self.driver.get_log, "browser")
        return [str(e.get("message", "")) for e in entries if e.get("level") == level]


async def start_browser(testcase: TestCase, script_timeout: float = 60.0) -> Browser:
    """A started :class:`Browser`, stopped in ``testcase``'s cleanup."""
    browser = Browser(script_timeout=script_timeout)
    testcase.addCleanup(browser.stop)
    return await browser.start()
