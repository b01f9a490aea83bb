"""Port tunneling end to end with real processes on 127.0.0.1: ticrypt-proxy
(pathway leases), ticrypt-rest, ticrypt-vmc (tunnel and SFTP servers),
ticrypt-vmhost and the user's ticrypt-connect, driven by the ``ticrypt``
CLI; a web server "inside the VM" on the test's reactor; curl and OpenSSH
sftp as the user's applications.

One deployment per test class; the classes whose tests change the
deployment (an idle lease, a proxy restart) have their own."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SkipTest, TestCase

from test.daemon import run_command, starter
from test.restfixture import admin_runner
from test.test_frontend_cli import ticrypt, ticrypt_here
from ticrypt.frontend.client import RestClient
from ticrypt.lab import apps
from ticrypt.lab.deploy import Addresses, Deployment, free_port

USER = "alice"
VM = "labvm"
MiB = 1024 * 1024


class Chain:
    """Every role of the tunnel path, started for one test."""

    dep: Deployment
    client_ini: str
    web_port: int
    sftp_port: int
    sftp_host_key: str
    www: str
    vm_id: str
    daemons: dict[str, Any]

    async def cli(self, *args: str, expect: int | None = 0) -> str:
        # tunnel commands as the console script; login in this process
        code, out, err = await (ticrypt if args[0] == "tunnel" else ticrypt_here)(
            self.client_ini, *args)
        if expect is not None and code != expect:
            raise AssertionError(f"ticrypt {' '.join(args)} exited {code}: {out}{err}")
        return out + err

    async def open_tunnel(self, *args: str) -> tuple[str, dict[int, int]]:
        """``ticrypt tunnel open labvm ARGS``: (tunnel id, {VM port: local port})."""
        out = await self.cli("tunnel", "open", VM, *args)
        ports = {int(r): int(loc) for loc, r in
                 re.findall(r"^127\.0\.0\.1:(\d+) -> labvm:(\d+)$", out, re.M)}
        m = re.search(r"^tunnel (t[0-9a-f]+) to labvm is up", out, re.M)
        assert m is not None and ports, out
        return m.group(1), ports

    async def connect_api(self, method: str, path: str) -> Any:
        """connect's API, as the CLI calls it."""
        with open(self.dep.path("connect-state/api.token")) as f:
            token = f.read().strip()
        from ticrypt.http.client import JsonClient

        status, answer = await JsonClient(reactor, None, timeout=30).request(
            method, f"http://127.0.0.1:{self.dep.addresses.connect_port}{path}",
            headers={"Authorization": "Bearer " + token})
        assert 200 <= status < 300, (status, answer)
        return answer

    async def rest(self) -> RestClient:
        with open(self.dep.path("client-state/session.json")) as f:
            token = json.load(f)["token"]
        return RestClient(reactor, self.dep.addresses.rest_url, self.dep.ca_file, token)


async def start_chain(tc: TestCase, *, leases: dict[str, str | None] | None = None,
                      tunnels: dict[str, str | None] | None = None) -> Chain:
    for tool in ("curl", "sftp"):
        if shutil.which(tool) is None:
            raise SkipTest(f"{tool} is not installed")
    c = Chain()
    vmhost_port, lease_base = free_port(), free_port()
    dep = c.dep = Deployment(tc.mktemp(), Addresses(
        rest_port=free_port(), vm_host=f"127.0.0.1:{vmhost_port}",
        lease_ports=f"{lease_base}-{lease_base + 9}"))
    run, start = admin_runner(), starter(tc)
    dep.ca()
    dep.feed_secret()
    dep.user_key(USER)
    dep.backend()  # the signing key init keeps: the proxy reads backend.pub before init ends
    dep.addresses.rest_port = free_port()  # the proxy's rest_url names it
    dep.rest_ini()
    dep.proxy_ini(leases=leases)
    # Independent start-up steps run concurrently; each waits only for what
    # it needs (rest names the proxy's ports, vmc enrolls with rest, vmhost
    # forwards to vmc's tunnel port, login goes through rest and connect).
    initialised = defer.ensureDeferred(dep.init(run, USER))
    proxy = await dep.start_proxy(start)
    await initialised
    rest_started = defer.ensureDeferred(dep.start_rest(start))
    vm_added = defer.ensureDeferred(dep.add_vm(run, USER, VM))
    dep.connect_ini(tunnels=tunnels)
    connect_started = defer.ensureDeferred(dep.start_connect(start))
    c.vm_id, token = await vm_added
    rest = await rest_started
    connect = await connect_started
    c.client_ini = dep.client_ini(USER)
    logged_in = defer.ensureDeferred(c.cli("login"))
    c.web_port = free_port()
    tunnel, sftp = dep.vm_tunnel(ports=(c.web_port,))
    c.sftp_port = int(str(sftp["port"]))
    vmc = await start("ticrypt-vmc", dep.vmc_ini(token, tunnel_settings=tunnel,
                                                 sftp_settings=sftp))
    c.sftp_host_key = str((vmc.ready_info or {})["sftp_host_key"])
    vmhost = await start("ticrypt-vmhost", dep.vmhost_ini(
        {1: f"127.0.0.1:{vmc.address('tunnel')[1]}"}, base=str(vmhost_port - 1)))
    c.daemons = {"proxy": proxy, "rest": rest, "vmc": vmc, "vmhost": vmhost,
                 "connect": connect}
    c.www = apps.web_folder(dep.path("www"))
    with open(os.path.join(c.www, "big.bin"), "wb") as f:
        f.write(os.urandom(4 * MiB))
    web = await apps.start_web(reactor, c.www, c.web_port)
    tc.addCleanup(web.stopListening)
    await logged_in
    return c


async def until(check: Any, seconds: float = 30.0) -> bool:
    """Poll ``check()`` (sync or async) every 50 ms for at most ``seconds``."""
    for _ in range(int(seconds / 0.05)):
        result = check()
        if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
            result = await result
        if result:
            return True
        await task.deferLater(reactor, 0.05, lambda: None)
    return False


class Download(protocol.Protocol):
    """``GET path`` over HTTP/1.0; collects the answer until the server closes."""

    def __init__(self, path: str, stall: bool = False):
        self.path = path
        self.stall = stall
        self.parts: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(f"GET {self.path} HTTP/1.0\r\n\r\n".encode())
        if self.stall:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.parts))

    def body(self) -> bytes:
        return b"".join(self.parts).partition(b"\r\n\r\n")[2]


async def download(port: int, path: str, stall: bool = False) -> Download:
    d = Download(path, stall)
    await endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30), d)
    return d


class TunnelUseTests(TestCase):
    """One deployment, one tunnel, the applications a researcher points at it."""

    timeout = 600

    async def test_open_curl_sftp_streams_list_close(self) -> None:
        c = await start_chain(self)
        rest = await c.rest()
        # a port the VM does not tunnel: one line, and the pathway is closed again
        out = await c.cli("tunnel", "open", VM, "--port", "9", expect=1)
        ports_text = ", ".join(map(str, sorted((c.web_port, c.sftp_port))))
        self.assertEqual(out.strip(), "ticrypt: cannot open a tunnel to labvm: labvm does not "
                         f"tunnel port 9; it tunnels {ports_text}")
        self.assertEqual(await rest.list_pathways(), [])

        tid, ports = await c.open_tunnel()
        self.assertEqual(set(ports), {c.web_port, c.sftp_port})
        web, sftp = ports[c.web_port], ports[c.sftp_port]

        # curl through the tunnel to the web server in the VM
        code, out, err = await run_command(
            ["curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{web}/hello.txt"])
        self.assertEqual((code, out), (0, "hello through the tunnel\n"), err)

        # OpenSSH sftp puts and gets 100 MiB through the SFTP port
        d = c.dep.dir
        with open(os.path.join(d, "up.bin"), "wb") as f:
            for _ in range(100):
                f.write(os.urandom(MiB))
        key, known = apps.openssh_files(d, c.dep.path(f"{USER}.key"), c.sftp_host_key, sftp)
        up, down = os.path.join(d, "up.bin"), os.path.join(d, "down.bin")
        batch = c.dep.write("batch", f"put {up} up.bin\nget up.bin {down}\n")
        argv = apps.sftp_argv(key, known, sftp, USER, batch)
        code, out, err = await run_command([shutil.which("sftp") or "sftp", *argv[1:]],
                                           timeout=300)
        self.assertEqual(code, 0, out + err)
        self.assertEqual(sha256(down), sha256(up))
        self.assertEqual(sha256(os.path.join(d, "vmc-sftp", "up.bin")), sha256(up))

        # 50 concurrent streams, one reader stalled: the other 49 finish
        with open(os.path.join(c.www, "big.bin"), "rb") as f:
            big = f.read()
        stalled = await download(web, "/big.bin", stall=True)
        others = [await download(web, "/big.bin") for _ in range(49)]
        await defer.gatherResults([o.done for o in others])
        self.assertEqual([o.body() == big for o in others], [True] * 49)
        self.assertFalse(stalled.done.called)
        listed = (await c.connect_api("GET", "/v1/tunnels"))["tunnels"]
        self.assertEqual(listed[0]["streams"], 1)  # the stalled one
        assert stalled.transport is not None
        stalled.transport.abortConnection()  # type: ignore[attr-defined]
        await stalled.done

        # tunnel list shows it with its bytes; close ends it and its pathway
        out = await c.cli("tunnel", "list")
        self.assertRegex(out, rf"{tid} +labvm +up +0 +[\d.]+ MiB +[\d.]+ MiB +.*"
                              rf"\b{web}->{c.web_port}\b")
        self.assertEqual(len(await rest.list_pathways()), 1)
        out = await c.cli("tunnel", "close", tid)
        self.assertEqual(out.strip(), f"closed tunnel {tid} to labvm")
        self.assertEqual(await rest.list_pathways(), [])
        with self.assertRaises(ConnectionRefusedError):
            await download(web, "/")
        self.assertIn(f"{tid}", open(c.dep.path("connect-audit.log")).read())
        out = await c.cli("tunnel", "list")
        self.assertEqual(out.strip().splitlines()[1:], [])


class LeaseIdleTests(TestCase):
    timeout = 300

    async def test_lease_closes_after_its_idle_timeout(self) -> None:
        c = await start_chain(self, leases={"idle_timeout": "2s"})
        tid, ports = await c.open_tunnel("--port", str(c.web_port))
        rest = await c.rest()
        [pathway] = await rest.list_pathways()
        # while the tunnel is open its TLS connection keeps the lease busy
        self.assertEqual(len(await rest.list_pathways()), 1)
        # end the tunnel at connect only: nothing uses the lease any more
        await c.connect_api("DELETE", f"/v1/tunnels/{tid}")

        async def gone() -> bool:
            return await rest.list_pathways() == []

        self.assertTrue(await until(gone, 30))
        with self.assertRaises(ConnectionRefusedError):
            await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(
                reactor, "127.0.0.1", int(pathway["port"]), timeout=10), protocol.Protocol())
        with open(c.dep.path("proxy-audit.log")) as f:
            closes = [e for e in map(json.loads, f) if e["event"] == "lease-close"]
        self.assertEqual([e["reason"] for e in closes], ["idle"])


class ProxyRestartTests(TestCase):
    timeout = 300

    async def test_connect_survives_a_proxy_restart(self) -> None:
        c = await start_chain(self, tunnels={"reconnect_initial": "0.2s",
                                             "reconnect_max": "1s"})
        tid, ports = await c.open_tunnel("--port", f"{c.web_port}:0")
        web = ports[c.web_port]
        code, out, _ = await run_command(["curl", "-sS", f"http://127.0.0.1:{web}/hello.txt"])
        self.assertEqual(out, "hello through the tunnel\n")

        await c.daemons["proxy"].stop()

        async def state(want: str) -> bool:
            [t] = (await c.connect_api("GET", "/v1/tunnels"))["tunnels"]
            return bool(t["state"] == want)

        self.assertTrue(await until(lambda: state("down"), 30))
        c.daemons["proxy"] = await c.dep.start_proxy(starter(self))
        self.assertTrue(await until(lambda: state("up"), 60))
        # the same local port, a new TLS connection through the restored lease
        code, out, err = await run_command(
            ["curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{web}/hello.txt"])
        self.assertEqual((code, out), (0, "hello through the tunnel\n"), err)
        [t] = (await c.connect_api("GET", "/v1/tunnels"))["tunnels"]
        self.assertEqual((t["id"], t["connects"]), (tid, 2))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()
