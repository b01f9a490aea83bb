"""The page end to end: real headless Chromium (test/browser.py) against a
real deployment (test/webchain.py: every role a ``twistd -n`` process,
connect serving the page), driven as a user would: import the key, sign
in, list VMs, a terminal (echo, paste, resize, a full-screen program, exit
status), exec, a tunnel and the VM's web page through it, revoke, and the
failures a user meets (session ended, not authorized, VM not running, proxy
unreachable).  The tap in front of the proxy checks that nothing the proxy
read during the browser sessions was plaintext.

Every wait is on the page's state (data-test attributes) with a deadline,
never a sleep.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from test.browser import Browser, chromium_skip_reason, start_browser
from test.daemon import starter
from test.restfixture import admin_runner
from test.test_tunnel_e2e import download
from test.vmcfixture import ws_payloads
from test.webchain import OWNER, PASSPHRASE, VM, WebChain, start_web_chain
from ticrypt.connect.page import vendor_missing
from ticrypt.frontend.client import RestClient

SKIP = chromium_skip_reason() or (
    f"xterm.js not installed (npm ci in ticrypt/connect/web): {vendor_missing()}"
    if vendor_missing() else None)

_UNTIL = """
const [sel, needle, isRegex, absent, timeoutMs, done] = arguments;
const t0 = Date.now();
const read = (el) => {
  if (!el) return "";
  const rows = el.classList.contains("xterm-rows")
    ? Array.from(el.children).map((r) => r.textContent).join("\\n") : el.textContent;
  return rows.replace(/\\u00a0/g, " ");
};
(function check() {
  const el = document.querySelector(sel);
  const text = read(el);
  const hit = el !== null && (isRegex ? new RegExp(needle, "m").test(text) : text.includes(needle));
  if (hit !== absent) { done({ok: true, text}); return; }
  if (Date.now() - t0 > timeoutMs) { done({ok: false, text, found: el !== null}); return; }
  setTimeout(check, 50);
})();
"""

ROWS = "[data-test=terminal] .xterm-rows"


class Page:
    """The test's hands and eyes on one browser tab of the page."""

    def __init__(self, browser: Browser):
        self.b = browser

    async def open(self, url: str) -> None:
        await self.b.get(url)
        await self.b.wait_for("body[data-ready]", 30)

    async def wait(self, css: str, timeout: float = 30.0) -> Any:
        try:
            return await self.b.wait_for(css, timeout)
        except Exception:
            raise AssertionError(f"{css} did not show in {timeout:g}s; the page shows: "
                                 f"{await self.shown()!r}") from None

    async def shown(self) -> str:
        """What the page shows (its visible text), for failure messages."""
        return str(await self.b.run("return document.body.innerText"))[-1500:]

    async def text(self, css: str) -> str:
        return str(await self.b.run(
            "const e = document.querySelector(arguments[0]); "
            "return e ? e.textContent.replace(/\\u00a0/g, ' ') : ''", css))

    async def attr(self, css: str, name: str) -> str | None:
        value = await self.b.run(
            "const e = document.querySelector(arguments[0]); "
            "return e ? e.getAttribute(arguments[1]) : null", css, name)
        return None if value is None else str(value)

    async def until(self, css: str, needle: str, *, regex: bool = False, absent: bool = False,
                    timeout: float = 30.0) -> str:
        """Wait until the text of ``css`` contains (or, ``absent``, no longer
        contains) ``needle``; the text."""
        r = await self.b.run_async(_UNTIL, css, needle, regex, absent, int(timeout * 1000))
        if not r["ok"]:
            raise AssertionError(f"{css}: {'still' if absent else 'no'} {needle!r} after "
                                 f"{timeout:g}s; text: {r['text'][-2000:]!r}")
        return str(r["text"])

    async def click(self, css: str) -> None:
        await self.wait(css)
        await self.b.click(css)

    async def fill(self, css: str, text: str) -> None:
        await self.b.run("document.querySelector(arguments[0]).value = ''", css)
        await self.b.type(css, text)

    async def keys(self, text: str) -> None:
        """Type into the terminal as a user does (xterm.js's own textarea)."""
        from selenium.webdriver.common.action_chains import ActionChains

        await self.b.run("document.querySelector('[data-test=terminal] "
                         ".xterm-helper-textarea').focus()")
        await self.b.call(lambda: ActionChains(self.b.driver).send_keys(text).perform())

    async def paste(self, text: str) -> None:
        """A clipboard paste into the terminal."""
        await self.b.run("""
            const ta = document.querySelector('[data-test=terminal] .xterm-helper-textarea');
            ta.focus();
            const dt = new DataTransfer();
            dt.setData('text/plain', arguments[0]);
            ta.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true,
                                                          cancelable: true}));""", text)

    async def import_key(self, path: str, user: str, passphrase: str = "") -> None:
        await self.wait("[data-test=key-form]")
        await self.fill("[data-test=key-user]", user)
        await self.b.type("[data-test=key-file]", path)
        if passphrase:
            await self.fill("[data-test=key-passphrase]", passphrase)
        await self.click("[data-test=key-import]")
        await self.wait("[data-test=signin-view]")

    async def sign_in(self) -> None:
        await self.click("[data-test=signin]")
        await self.wait("[data-test=vm-list], [data-test=vm-list-empty]")

    async def session_storage(self, key: str) -> Any:
        return json.loads(await self.b.run("return sessionStorage.getItem(arguments[0])", key)
                          or "null")

    async def console_errors(self, *expected: str) -> list[str]:
        """Console errors (a CSP violation included: the terminal must render
        under the strict policy without one), without those containing one of
        ``expected`` (a refusal the test caused)."""
        return [e for e in await self.b.logs() if not any(x in e for x in expected)]


async def new_page(tc: TestCase, chain: WebChain) -> Page:
    page = Page(await start_browser(tc))
    await page.open(await chain.page_link())
    return page


async def chain_for(tc: TestCase, users: tuple[str, ...] = (),
                    limits: dict[str, str | None] | None = None) -> WebChain:
    return await start_web_chain(reactor, tc.mktemp(), admin_runner(), starter(tc), tc.addCleanup,
                                 users=users, proxy_limits=limits)


class OwnerTests(TestCase):
    """The VM's owner works in the page without the CLI."""

    skip = SKIP
    timeout = 400

    async def test_key_terminal_exec_tunnel_no_plaintext(self) -> None:
        c = await chain_for(self)
        page = await new_page(self, c)
        marker = "MARK" + os.urandom(6).hex()

        # -- the key (passphrase-protected copy), a wrong passphrase first
        await page.wait("[data-test=key-form]")
        await page.fill("[data-test=key-user]", OWNER)
        await page.b.type("[data-test=key-file]", c.dep.path(f"{OWNER}-enc.key"))
        await page.fill("[data-test=key-passphrase]", "not it")
        await page.click("[data-test=key-import]")
        await page.wait("[data-test=key-error][data-code=bad-passphrase]")
        await page.fill("[data-test=key-passphrase]", PASSPHRASE)
        await page.click("[data-test=key-import]")
        await page.wait("[data-test=signin-view]")

        # -- sign in; the VM list shows labvm, enrolled
        await page.sign_in()
        row = f"[data-test=vm-row][data-vm-name={VM}]"
        self.assertEqual(await page.attr(row, "data-state"), "enrolled")
        self.assertEqual(await page.attr(row, "data-vm-id"), c.vm_id)
        self.assertEqual((await page.session_storage("ticrypt.rest"))["role"], "superadmin")

        # -- a terminal: echo, paste, resize, a full-screen program, exit status
        await page.click(f"{row} [data-test=vm-link]")
        await page.wait("[data-test=terminal-state][data-state=running]", 45)
        self.assertEqual(await page.attr("[data-test=vm-session]", "data-state"), "open")
        await page.keys("echo hello-$((6*7))\n")
        await page.until(ROWS, "hello-42")
        await page.keys(f"echo {marker}-$((1+1))\n")
        await page.until(ROWS, f"{marker}-2")
        await page.paste("echo pasted-$((2+3))")  # bracketed paste: Enter runs it
        await page.until(ROWS, "echo pasted-$((2+3))")
        await page.keys("\n")
        await page.until(ROWS, "pasted-5")

        await page.keys("echo size=$(stty size)=\n")
        before = re.findall(r"size=(\d+) (\d+)=", await page.until(ROWS, r"size=\d+ \d+=",
                                                                   regex=True))[-1]
        rows_before = await page.b.run(f"return document.querySelector('{ROWS}').children.length")
        await page.b.call(page.b.driver.set_window_size, 900, 700)
        await page.b.run_async(f"""
            const done = arguments[arguments.length - 1];
            (function check() {{
              if (document.querySelector('{ROWS}').children.length !== {rows_before}) done(true);
              else setTimeout(check, 50);
            }})();""")
        await page.keys("echo again=$(stty size)=\n")
        after = re.findall(r"again=(\d+) (\d+)=", await page.until(ROWS, r"again=\d+ \d+=",
                                                                   regex=True))[-1]
        self.assertLess(int(after[0]), int(before[0]), (before, after))
        self.assertLess(int(after[1]), int(before[1]), (before, after))

        await page.keys("top\n")
        await page.until(ROWS, "load average")
        await page.keys("q")
        await page.until(ROWS, "load average", absent=True)
        await page.keys("echo back-$((3*3))\n")
        await page.until(ROWS, "back-9")
        # vi on the alternate screen; quitting brings the shell's screen back
        await page.keys("vi\n")
        await page.until(ROWS, "back-9", absent=True)
        await page.until(ROWS, "VIM - Vi IMproved")
        await page.keys(":q!\n")
        await page.until(ROWS, "back-9")
        await page.keys("exit 5\n")
        await page.wait("[data-test=terminal-state][data-state=exited][data-exit='5']")

        # -- exec: streamed stdout and stderr, the exit status
        await page.click("[data-test=tab-exec]")
        await page.fill("[data-test=exec-command]",
                        f"echo out-$((1+2)); echo err-$((2+2)) >&2; echo {marker}-exec; exit 3")
        await page.click("[data-test=exec-run]")
        await page.wait("[data-test=exec-status][data-state=exited]", 45)
        self.assertEqual(await page.attr("[data-test=exec-status]", "data-exit"), "3")
        output = await page.text("[data-test=exec-output]")
        self.assertIn("out-3", output)
        self.assertIn(f"{marker}-exec", output)
        self.assertEqual((await page.text("[data-test=exec-output] .stderr")).strip(), "err-4")

        # -- a tunnel: every port the VM offers; the VM's web page through it
        await page.click("[data-test=tab-tunnels]")
        await page.click("[data-test=tunnel-open]")
        await page.wait("[data-test=tunnel-opened]", 90)
        # the table is drawn after the notice: a link for each port the VM offers
        link = f"[data-test=tunnel-link][data-remote='{c.web_port}']"
        await page.wait(link)
        await page.wait(f"[data-test=tunnel-link][data-remote='{c.sftp_port}']")
        local = int(await page.attr(link, "data-local") or 0)
        got = await download(local, "/hello.txt")
        await got.done
        self.assertEqual(got.body(), b"hello through the tunnel\n")
        await page.click("[data-test=tunnel-refresh]")
        await page.wait("[data-test=tunnel-row][data-state=up]")
        shown = await page.until("[data-test=tunnel-bytes-in]", "^0 B$", regex=True, absent=True)
        self.assertRegex(shown, r"^[1-9][0-9.]* (B|KiB|MiB)$")
        [t] = (await c.connect_api("GET", "/v1/tunnels"))["tunnels"]
        self.assertEqual((t["vm"], t["state"]), (c.vm_id, "up"))
        rest = RestClient(reactor, c.dep.addresses.rest_url, c.dep.ca_file,
                          (await page.session_storage("ticrypt.rest"))["token"])
        self.assertEqual([p["id"] for p in await rest.list_pathways()], [t["pathway"]])
        await page.click("[data-test=tunnel-close]")
        await page.wait("[data-test=tunnel-closed]")
        self.assertEqual((await c.connect_api("GET", "/v1/tunnels"))["tunnels"], [])
        self.assertEqual(await rest.list_pathways(), [])

        # -- the session ended at rest: back at sign-in with the reason
        await rest.logout()
        await page.click("[data-test=nav-vms]")
        reason = await page.until("[data-test=signin-reason]", "session-revoked")
        self.assertIn("Sign in again", reason)
        await page.sign_in()

        # -- the proxy read no plaintext of any of it
        self.assertEqual(await page.console_errors("/rest/v1/vms - Failed to load resource: "
                                                   "the server responded with a status of 401"),
                         [])
        raw = c.tap.raw()
        up = [p for r in c.tap.recordings for p in ws_payloads(bytes(r.up))]
        down = [p for r in c.tap.recordings for p in ws_payloads(bytes(r.down))]
        # the capture works: the relay's control messages, records both ways
        self.assertTrue(any(b'"connect"' in p and b'"ticket"' in p for p in up))
        self.assertTrue(any(b'"paired"' in p for p in down))
        self.assertTrue(any(p[:1] == b"\x01" and len(p) > 25 for p in up))
        self.assertTrue(any(p[:1] == b"\x01" and len(p) > 25 for p in down))
        for plain in (marker.encode(), b"hello-42", b"out-3", b"err-4", b"load average",
                      b"stty", b"tunnel-accept", b"BEGIN CERTIFICATE"):
            self.assertNotIn(plain, raw)
            self.assertFalse(any(plain in p for p in up + down), plain)


class RevokeTests(TestCase):
    """The owner revokes a user whose terminal is open; then the VM and the
    proxy go away: each failure is a clear state with its code."""

    skip = SKIP
    timeout = 400

    async def test_revoke_closes_terminal_and_failure_states(self) -> None:
        c = await chain_for(self, users=("bob",), limits={"user_wait_timeout": "2s"})
        alice = await new_page(self, c)
        await alice.import_key(c.key_file(OWNER), OWNER)
        await alice.sign_in()
        await alice.click(f"[data-test=vm-row][data-vm-name={VM}] [data-test=vm-link]")
        await alice.click("[data-test=tab-users]")
        await alice.wait("[data-test=user-row][data-role=owner]", 45)
        await alice.fill("[data-test=authorize-name]", "bob")  # key looked up at rest
        await alice.click("[data-test=authorize-submit]")
        await alice.wait("[data-test=users-ok]")
        await alice.wait("[data-test=user-row][data-name=bob]")

        bob = await new_page(self, c)
        await bob.import_key(c.key_file("bob"), "bob")
        await bob.sign_in()
        await bob.wait("[data-test=vm-list-empty]")  # rest lists only one's own VMs
        await bob.fill("[data-test=vm-open-id]", c.vm_id)
        await bob.click("[data-test=vm-open]")
        await bob.wait("[data-test=terminal-state][data-state=running]", 45)
        await bob.keys("echo bob-$((40+2))\n")
        await bob.until(ROWS, "bob-42")

        await alice.click("[data-test=user-revoke][data-name=bob]")
        await alice.wait("[data-test=users-ok]")
        state = "[data-test=terminal-state][data-state=failed][data-code=not-authorized]"
        await bob.wait(state, 30)
        self.assertIn("not authorized", await bob.text(state))
        await bob.click("[data-test=vm-reconnect]")
        await bob.wait("[data-test=vm-session][data-state=failed][data-code=not-authorized]")

        # the VM stops: alice's session ends; a new one finds no VM (4004)
        await c.daemons["vmc"].stop()
        await alice.wait("[data-test=vm-session][data-state=failed]", 30)
        await alice.click("[data-test=vm-reconnect]")
        await alice.wait("[data-test=vm-session][data-code=no-vm-available]", 30)
        self.assertIn("is it running", await alice.text("[data-test=vm-session]"))

        # the proxy is gone: connect's relay cannot reach it (4013)
        await c.daemons["proxy"].stop()
        await alice.click("[data-test=vm-reconnect]")
        await alice.wait("[data-test=vm-session][data-code=proxy-unreachable]", 30)
        for page in (alice, bob):
            self.assertEqual(await page.console_errors(), [])
