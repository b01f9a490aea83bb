"""Headless Chromium for the browser tests (the page served by connect).

:class:`Browser` wraps selenium's Chrome driver on the Debian packages
``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (given explicitly, so
Selenium Manager never downloads anything).  Every blocking driver call runs
in the browser's own thread, so a Twisted server in the same process keeps
serving the page while a test awaits::

    reason = chromium_skip_reason()          # at class level: skip = reason

    b = await start_browser(self)            # given back in cleanup
    await b.get(url)
    result = await b.run_async("const done = arguments[arguments.length - 1]; ...")

A browser costs ~1.5 s of CPU to start, more than most tests spend in it,
so :func:`start_browser` lends one from a pool of this process: at the end
of a test (its cleanup) :meth:`Browser.reset` gives it back as new (one
blank tab, cookies, cache and every storage of the origins it loaded
cleared, window size, console log drained); a browser that cannot be reset
is stopped.  Pooled browsers are stopped when the process exits; should the
process die without that, chromedriver dies with it (``PR_SET_PDEATHSIG``
from the thread that started it) and Chromium with chromedriver (DevTools
over a pipe).  Trial's janitor sees none of this: no reactor-owned process,
socket or timer outlives a test.

Tests skip with :func:`chromium_skip_reason` (one line) only when chromium,
chromedriver or selenium is missing.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import queue
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ticrypt.vmc.processes import descendants, proc_info, scan_proc

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: the window of a new or reset browser
WINDOW = (1280, 900)

FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}",
    # chromedriver talks DevTools over a pipe: Chromium quits when chromedriver dies
    "--remote-debugging-pipe",
    # the omnibox popup's WebUI, rendered at start-up in a renderer of its own
    # although a headless window has no omnibox: half of a start's CPU (3.0 s
    # -> 1.6 s here; none of the other flags changes it measurably)
    "--disable-features=WebUIOmniboxPopup,WebUIOmniboxAimPopup,PreloadTopChromeWebUI",
)

__all__ = ["CHROMEDRIVER", "CHROMIUM", "FLAGS", "WINDOW", "Browser", "chromium_skip_reason",
           "serve", "start_browser"]

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


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


def _dying_with_parent() -> Callable[[], None]:
    """For chromedriver's ``preexec_fn``: SIGKILL when the thread that
    started it ends (looked up before the fork: a child of a threaded
    process should only make the system call)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return preexec


class _Thread:
    """One thread for one browser's blocking calls, in order; results as Deferreds."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], defer.Deferred[Any]] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="chromium", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, d = item
            try:
                result = fn()
            except BaseException:
                reactor.callFromThread(d.errback, Failure())  # type: ignore[attr-defined]
            else:
                reactor.callFromThread(d.callback, result)  # type: ignore[attr-defined]

    def call(self, fn: Callable[[], T]) -> defer.Deferred[T]:
        d: defer.Deferred[T] = defer.Deferred()
        self._calls.put((fn, d))
        return d

    def stop(self) -> None:
        self._calls.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()


# in-page wait until the first element matching a selector is displayed:
# rendered (no display:none, visibility:hidden or opacity 0 up the tree,
# as selenium's isDisplayed) with a box of some size; the element, or null
# after the time given
_SHOWN = """
const [css, timeoutMs, done] = arguments;
const t0 = Date.now();
const shown = (el) => el.checkVisibility({opacityProperty: true, visibilityProperty: true})
  && Array.from(el.getClientRects()).some((r) => r.width > 0 && r.height > 0);
(function check() {
  const el = document.querySelector(css);
  if (el !== null && shown(el)) { done(el); return; }
  if (Date.now() - t0 >= timeoutMs) { done(null); return; }
  setTimeout(check, 25);
})();
"""


class Browser:
    """One headless Chromium driven by chromedriver; blocking calls in its thread.

    ``await start()`` launches it (``get`` starts it too if needed);
    ``await reset()`` makes it as new for another test; ``stop()`` quits
    the browser, stops the chromedriver this object started and kills what
    it left behind (only processes started below that chromedriver), then
    removes the fresh profile folder.
    """

    def __init__(self, script_timeout: float = 60.0) -> None:
        self.script_timeout = script_timeout
        self.driver: Any = None
        self._service: Any = None
        self._profile: str | None = None
        self._thread: _Thread | None = None
        self._urls: set[str] = set()

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
        self._service = Service(executable_path=CHROMEDRIVER,
                                popen_kw={"preexec_fn": _dying_with_parent()})
        self.driver = webdriver.Chrome(service=self._service, options=options)
        self.driver.set_window_size(*WINDOW)
        self.driver.set_script_timeout(self.script_timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """``fn(*args)`` in the browser's thread (for driver calls of one's own)."""
        if self._thread is None:
            self._thread = _Thread()
        return self._thread.call(lambda: fn(*args))

    async def start(self) -> Browser:
        """Launch chromium (no-op when already running)."""
        if self.driver is None:
            await self.call(self._start_blocking)
        return self

    def stop(self) -> None:
        """Quit the browser and the chromedriver this object started.

        Synchronous (for ``addCleanup`` and exit); nothing the page talks
        to needs to keep serving while the browser quits."""
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
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def _reset_blocking(self) -> None:
        d = self.driver
        # a new tab (a new sessionStorage), every other one closed: their
        # pages stop, with their timers and websockets
        old = list(d.window_handles)
        for target in d.execute_cdp_cmd("Target.getTargets", {})["targetInfos"]:
            self._urls.add(target.get("url", ""))
        d.switch_to.new_window("tab")
        fresh = d.current_window_handle
        for handle in old:
            d.switch_to.window(handle)
            d.close()
        d.switch_to.window(fresh)
        for url in self._urls:
            parts = urlsplit(url)
            if parts.scheme in ("http", "https"):
                d.execute_cdp_cmd("Storage.clearDataForOrigin", {
                    "origin": f"{parts.scheme}://{parts.netloc}", "storageTypes": "all"})
        self._urls.clear()
        d.execute_cdp_cmd("Network.clearBrowserCookies", {})
        d.execute_cdp_cmd("Network.clearBrowserCache", {})
        d.set_window_size(*WINDOW)
        d.get_log("browser")

    async def reset(self) -> None:
        """As new for another test: one blank tab; cookies, cache and every
        storage (IndexedDB, local storage...) of the origins loaded cleared;
        the window at :data:`WINDOW`; the console log drained.  Raises if the
        browser does not answer (then stop it)."""
        await self.call(self._reset_blocking)

    # -- page --------------------------------------------------------------

    async def get(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        await self.start()
        self._urls.add(url)
        await self.call(self.driver.get, url)

    async def run(self, js: str, *args: Any) -> Any:
        """``execute_script``: the value ``js`` returns (JSON-like)."""
        return await self.call(self.driver.execute_script, js, *args)

    async def run_async(self, js: str, *args: Any) -> Any:
        """``execute_async_script``: ``js`` calls ``arguments[arguments.length-1](value)``.

        A script that never calls back fails after ``script_timeout`` seconds."""
        return await self.call(self.driver.execute_async_script, js, *args)

    async def wait_for(self, css: str, timeout: float = 10.0) -> Any:
        """Wait until the first element matching ``css`` is displayed; the element.

        The page itself checks every 25 ms (one driver call, instead of
        two per check with selenium's WebDriverWait, which also sends its
        whole isDisplayed script each time)."""
        import time

        from selenium.common.exceptions import TimeoutException, WebDriverException

        def wait() -> Any:
            deadline = time.monotonic() + timeout
            error: Exception | None = None
            for _ in range(100):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    el = self.driver.execute_async_script(
                        _SHOWN, css, int(min(left, self.script_timeout - 1) * 1000))
                except WebDriverException as e:
                    error = e  # the document went away meanwhile (a navigation): again
                    continue
                if el is not None:
                    return el
            raise TimeoutException(f"{css} not displayed within {timeout:g}s") from error
        return await self.call(wait)

    async def click(self, css: str) -> None:
        """Click the first element matching ``css``."""
        from selenium.webdriver.common.by import By
        await self.call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def type(self, css: str, text: str) -> None:
        """Type ``text`` into the first element matching ``css``."""
        from selenium.webdriver.common.by import By
        await self.call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).send_keys(text))

    async def screenshot(self, path: str) -> None:
        """Save a PNG of the window to ``path``."""
        def shoot() -> None:
            if not self.driver.save_screenshot(path):
                raise OSError(f"screenshot to {path} failed")
        await self.call(shoot)

    async def logs(self, level: str = "SEVERE") -> list[str]:
        """Console messages at ``level`` (default errors) since the last call."""
        entries = await self.call(self.driver.get_log, "browser")
        return [str(e.get("message", "")) for e in entries if e.get("level") == level]


# -- the pool of this process ------------------------------------------------

_idle: list[Browser] = []
_lent: list[Browser] = []


@atexit.register
def _stop_all() -> None:
    for browser in _idle + _lent:
        browser.stop()
    _idle.clear()
    _lent.clear()


async def _give_back(browser: Browser) -> None:
    _lent.remove(browser)
    try:
        await browser.reset()
    except Exception:
        browser.stop()
        return
    _idle.append(browser)


async def start_browser(testcase: TestCase, script_timeout: float = 60.0) -> Browser:
    """A started :class:`Browser` for ``testcase`` alone, as new: an idle one
    of this process's pool, else a new one; given back (reset) in cleanup.
    Two calls in one test give two browsers (two users, say)."""
    while _idle:
        browser = _idle.pop()
        try:
            await browser.call(browser.driver.set_script_timeout, script_timeout)
        except Exception:  # it died idle: another one
            browser.stop()
            continue
        browser.script_timeout = script_timeout
        break
    else:
        browser = Browser(script_timeout=script_timeout)
    _lent.append(browser)
    testcase.addCleanup(_give_back, browser)
    return await browser.start()


# -- servers in this process -------------------------------------------------

class _Tracked(WrappingFactory):
    """``factory``'s connections, each of which can be ended and waited for."""

    def __init__(self, factory: IProtocolFactory) -> None:
        super().__init__(factory)
        self._waiters: list[defer.Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def end_all(self) -> defer.Deferred[None]:
        """Abort every open connection; fires when they are all gone."""
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


def serve(testcase: TestCase, factory: IProtocolFactory) -> int:
    """Listen with ``factory`` on 127.0.0.1 (a free port, returned) for
    ``testcase``.  In cleanup, after the browsers it lent are given back (call
    this before :func:`start_browser`), it stops listening and ends the
    connections still open: a pooled browser keeps idle keep-alive
    connections to the servers it used, which trial would find in the reactor."""
    tracked = _Tracked(factory)
    port = reactor.listenTCP(0, tracked, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    testcase.addCleanup(tracked.end_all)
    testcase.addCleanup(port.stopListening)
    return int(port.getHost().port)  # type: ignore[attr-defined]
