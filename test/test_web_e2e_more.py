"""More of the page end to end (real headless Chromium against a real
deployment, test/webchain.py), the states the first round left: the
allow-list page (superadmins; a plain user's "superadmins only"),
``ticrypt open`` handing its one-time link to the user's browser (and the
link refused the second time), the tunnel table refreshing itself, a
tunnel the VM refuses, a VM whose key is not the one rest holds, and a
session that expires at rest while the user does nothing.

One deployment per test class; every wait is on the page's state with a
deadline, never a sleep.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from test.browser import start_browser
from test.daemon import daemon_env, run_command, script_path, starter
from test.restfixture import admin_runner
from test.test_tunnel_e2e import download
from test.test_web_e2e import SKIP, Page, new_page
from test.vmcfixture import ws_payloads
from test.webchain import OWNER, VM, WebChain, start_web_chain
from ticrypt import identity
from ticrypt.frontend.client import RestClient

_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}


def _bytes(shown: str) -> float:
    """The number of bytes a size of the page ("1.5 KiB") stands for."""
    value, unit = shown.split()
    return float(value) * _UNITS[unit]


async def _chain(tc: TestCase, **kw: Any) -> WebChain:
    return await start_web_chain(reactor, tc.mktemp(), admin_runner(), starter(tc), tc.addCleanup,
                                 **kw)


async def _rest(page: Page, chain: WebChain) -> RestClient:
    """rest's client with the session the page signed in with."""
    return RestClient(reactor, chain.dep.addresses.rest_url, chain.dep.ca_file,
                      (await page.session_storage("ticrypt.rest"))["token"])


def _audit(chain: WebChain, name: str) -> list[dict[str, Any]]:
    with open(chain.dep.path(name)) as f:
        return [json.loads(line) for line in f if line.strip()]


class LinkAllowlistTunnelsTests(TestCase):
    """``ticrypt open`` into the user's browser; the allow-list page for a
    superadmin and for a plain user; the tunnel table keeps itself current."""

    skip = SKIP
    timeout = 400

    async def test_open_allowlist_and_tunnel_refresh(self) -> None:
        c = await _chain(self, users=("bob",))

        # -- ticrypt open (no --print): the URL goes to $BROWSER, which records it
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        record = os.path.join(folder, "opened")
        browser_cmd = os.path.join(folder, "browser")
        with open(browser_cmd, "w") as f:
            f.write(f'#!/bin/sh\nprintf "%s\\n" "$1" >> "{record}"\n')
        os.chmod(browser_cmd, 0o700)
        env = {**daemon_env(), "TICRYPT_CLIENT_CONFIG": c.client_inis[OWNER],
               "BROWSER": browser_cmd}
        code, out, err = await run_command([script_path("ticrypt"), "open"], env=env)
        self.assertEqual((code, err), (0, ""))
        with open(record) as f:
            [url] = f.read().split()
        self.assertEqual(out.split(), [url])
        self.assertRegex(url, "^" + re.escape(c.connect_url) + r"/#link=[A-Za-z0-9_-]{43}$")

        # Chromium redeems it: a page token, and the link gone from the address bar
        alice = Page(await start_browser(self))
        await alice.open(url)
        await alice.wait("[data-test=key-form]")
        self.assertTrue(await alice.b.run("return sessionStorage.getItem('ticrypt.page')"))
        self.assertNotIn("#link", await alice.b.run("return location.href"))
        await alice.import_key(c.key_file(OWNER), OWNER)
        await alice.sign_in()

        # a second use of the same link (another browser) is refused
        other = Page(await start_browser(self))
        await other.open(url)
        problem = "[data-test=page-problem][data-code=bad-link]"
        await other.wait(problem)
        self.assertIn("already used or has expired", await other.text(problem))
        self.assertIsNone(await other.b.run("return sessionStorage.getItem('ticrypt.page')"))

        # -- the allow-list: add (name, ports, protocol, comment), listed, at rest too
        await alice.click("[data-test=nav-allowlist]")
        await alice.wait("[data-test=allow-empty]")
        await alice.fill("[data-test=allow-name]", "License.Example.org")
        await alice.fill("[data-test=allow-ports]", "27001, 27000")
        await alice.b.run("document.querySelector('[data-test=allow-protocol]').value = 'udp'")
        await alice.fill("[data-test=allow-comment]", "the solver's licenses")
        await alice.click("[data-test=allow-add]")
        await alice.wait("[data-test=allow-ok]")
        row = "[data-test=allow-row][data-name='license.example.org']"
        await alice.wait(row)
        self.assertIn("27000, 27001", await alice.text(row))
        self.assertIn("the solver's licenses", await alice.text(row))
        rest = await _rest(alice, c)
        [entry] = await rest.list_allowlist()
        self.assertEqual((entry["name"], entry["ports"], entry["protocol"], entry["comment"]),
                         ("license.example.org", [27000, 27001], "udp", "the solver's licenses"))
        self.assertEqual(await alice.attr(row, "data-id"), entry["id"])

        # a bad name: rest's invalid-field line, nothing added
        await alice.fill("[data-test=allow-name]", "not a name!")
        await alice.fill("[data-test=allow-ports]", "1234")
        await alice.click("[data-test=allow-add]")
        bad = "[data-test=allow-error][data-code=invalid-field]"
        await alice.wait(bad)
        self.assertIn("field 'name' is not an allow-list name", await alice.text(bad))
        self.assertEqual(len(await rest.list_allowlist()), 1)

        # remove it
        await alice.click(f"[data-test=allow-remove][data-id='{entry['id']}']")
        await alice.wait("[data-test=allow-empty]")
        self.assertEqual(await rest.list_allowlist(), [])

        # -- a plain user: no Allow-list navigation; by hand, "superadmins only"
        await other.open(await c.page_link())
        await other.import_key(c.key_file("bob"), "bob")
        await other.sign_in()
        await other.wait("[data-test=nav-tunnels]")
        self.assertIsNone(await other.b.run(
            "return document.querySelector('[data-test=nav-allowlist]')"))
        await other.b.run("location.hash = '#/allowlist'")
        forbidden = "[data-test=allow-forbidden][data-code=forbidden]"
        await other.wait(forbidden)
        text = await other.text(forbidden)
        self.assertIn("Superadmins only", text)
        self.assertIn("this needs the superadmin role (forbidden)", text)
        self.assertFalse(await other.b.run(
            "return document.querySelector('[data-test=allow-add-form]').checkVisibility()"))

        # -- the tunnel table refreshes itself while shown, and stops when hidden
        await alice.b.run(f"location.hash = '#/vm/{c.vm_id}/tunnels'")
        await alice.click("[data-test=tunnel-open]")
        await alice.wait("[data-test=tunnel-opened]", 90)
        panel = "[data-test=tunnel-panel]:not([hidden])"
        await alice.wait(f"{panel}[data-auto-refresh=on]")
        await alice.click("[data-test=tab-exec]")
        self.assertEqual(await alice.attr("[data-test=tunnel-panel]", "data-auto-refresh"),
                         "off")
        await alice.click("[data-test=nav-tunnels]")
        await alice.wait("[data-test=tunnels-view] [data-test=tunnel-row][data-state=up]")
        await alice.wait(f"[data-test=tunnels-view] {panel}[data-auto-refresh=on]")
        cell = "[data-test=tunnels-view] [data-test=tunnel-bytes-in]"
        before = await alice.text(cell)
        local = int(await alice.attr(f"[data-test=tunnel-link][data-remote='{c.web_port}']",
                                     "data-local") or 0)
        got = await download(local, "/hello.txt")
        await got.done
        self.assertEqual(got.body(), b"hello through the tunnel\n")
        after = await alice.until(cell, "^" + re.escape(before) + "$", regex=True, absent=True)
        self.assertGreater(_bytes(after), _bytes(before), (before, after))
        self.assertEqual(await alice.text("[data-test=tunnels-view] [data-test=tunnel-streams]"),
                         "0")
        # the Close button of a refreshing table: closes, and the pathway goes too
        await alice.click("[data-test=tunnels-view] [data-test=tunnel-close]")
        await alice.wait("[data-test=tunnel-closed]")
        await alice.wait("[data-test=tunnels-view] [data-test=tunnel-empty]")
        self.assertEqual((await c.connect_api("GET", "/v1/tunnels"))["tunnels"], [])
        self.assertEqual(await rest.list_pathways(), [])
        await alice.click("[data-test=nav-vms]")
        await alice.wait("[data-test=vm-list]")
        self.assertEqual(await alice.console_errors(  # the bad name
            "/rest/v1/allowlist - Failed to load resource: the server responded with a status "
            "of 400"), [])
        self.assertEqual(await other.console_errors(
            "/v1/page/session - Failed to load resource: the server responded with a status "
            "of 401", "/rest/v1/allowlist - Failed to load resource: the server responded "
            "with a status of 403"), [])


class RefusedTunnelKeyMismatchTests(TestCase):
    """A VM whose vmc runs no tunnel server refuses the tunnel; then rest's
    record of the VM's key changes and the page refuses the VM."""

    skip = SKIP
    timeout = 400

    async def test_tunnel_refused_then_vm_key_mismatch(self) -> None:
        c = await _chain(self, tunnel_server=False)
        page = await new_page(self, c)
        await page.import_key(c.key_file(OWNER), OWNER)
        await page.sign_in()
        rest = await _rest(page, c)

        # -- the tunnel refused by the VM: code and line, the pathway released
        await page.b.run(f"location.hash = '#/vm/{c.vm_id}/tunnels'")
        await page.click("[data-test=tunnel-open]")
        refused = "[data-test=tunnel-error][data-code=tunnel-disabled]"
        await page.wait(refused, 60)
        text = await page.text(refused)
        self.assertIn("the VM refused the certificate", text)
        self.assertIn("the tunnel server is not enabled on this VM", text)
        await page.wait("[data-test=tunnel-empty]")
        self.assertEqual((await c.connect_api("GET", "/v1/tunnels"))["tunnels"], [])
        self.assertEqual(await rest.list_pathways(), [])
        events = [e for e in _audit(c, "rest_audit") if e.get("event", "").startswith("pathway")]
        self.assertEqual([e["event"] for e in events], ["pathway-opened", "pathway-closed"],
                         events)

        # -- rest now holds another key for the VM than the one its vmc holds
        await page.click("[data-test=nav-vms]")
        await page.wait("[data-test=vm-list]")
        await c.daemons["rest"].stop()
        other = identity.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        db = sqlite3.connect(c.dep.path("rest_db"))
        try:
            with db:
                changed = db.execute("UPDATE vms SET public_key = ? WHERE id = ?",
                                     (other, c.vm_id)).rowcount
        finally:
            db.close()
        self.assertEqual(changed, 1)
        await c.restart_rest()
        seen = len(c.tap.recordings)

        await page.click(f"[data-test=vm-row][data-vm-name={VM}] [data-test=vm-link]")
        state = "[data-test=terminal-state][data-state=failed][data-code=vm-key-mismatch]"
        await page.wait(state, 45)
        self.assertIn("the VM presented a key other than the one registered in rest",
                      await page.text(state))
        await page.wait("[data-test=vm-session][data-state=failed][data-code=vm-key-mismatch]")

        # the proxy relayed the hellos and nothing after them
        new = c.tap.recordings[seen:]
        up = [p for r in new for p in ws_payloads(bytes(r.up))]
        down = [p for r in new for p in ws_payloads(bytes(r.down))]
        self.assertTrue(any(b'"type":"connect"' in p for p in up), up)
        self.assertTrue(any(b'"role":"user"' in p and b'"type":"hello"' in p for p in up), up)
        self.assertTrue(any(b'"role":"vm"' in p and b'"type":"hello"' in p for p in up + down))
        for p in up + down:
            self.assertNotIn(b'"type":"finish"', p)
            self.assertFalse(p[:1] == b"\x01" and len(p) >= 25, p[:40])
        self.assertEqual(await page.console_errors(), [])


class SessionExpiredTests(TestCase):
    """rest's session runs out while the page sits on the VM list: the page
    goes to sign-in by itself, with rest's reason."""

    skip = SKIP
    timeout = 300

    async def test_expired_session_back_at_sign_in(self) -> None:
        c = await _chain(self, tunnel_server=False, rest_settings={"session_ttl": "3s"})
        page = await new_page(self, c)
        await page.import_key(c.key_file(OWNER), OWNER)
        await page.sign_in()
        reason = await page.until("[data-test=signin-reason]", "session-expired", timeout=45)
        self.assertIn("the session has expired", reason)
        self.assertIn("Sign in again", reason)
        self.assertIsNone(await page.session_storage("ticrypt.rest"))
        self.assertEqual(await page.attr("[data-test=signin]", "data-test"), "signin")
        await page.sign_in()  # and signing in again works
        self.assertEqual(await page.console_errors(
            "/rest/v1/me - Failed to load resource: the server responded with a status of 401"),
            [])
