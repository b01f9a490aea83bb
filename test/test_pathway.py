"""Pathways end to end: rest (run in this process, test/restfixture.py) asks
the control API of a real ``twistd ticrypt-proxy`` for a lease; the lease
forwards 127.0.0.1 to an echo server standing in for the VM host endpoint;
127.0.0.2 is refused before any byte; DELETE, logout, exhaustion and a
proxy restart."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.trial.unittest import TestCase

from test.daemon import starter
from test.restfixture import RestEnv, admin_runner
from ticrypt import identity
from ticrypt.frontend.client import RestClient, RestError
from ticrypt.lab.deploy import Addresses, Deployment, free_port

reactor: Any = _reactor

FINGERPRINT = "sha256:" + "ab" * 32


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class EchoFactory(ServerFactory):
    protocol = Echo

    def __init__(self) -> None:
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.accepted += 1
        return super().buildProtocol(addr)


class Collect(Protocol):
    """Send ``payload`` once connected; close when as much came back."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.data = b""
        self.made = False
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made = True
        assert self.transport is not None
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= len(self.payload):
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


async def exchange(port: int, payload: bytes, source: str = "127.0.0.1") -> tuple[bool, bytes]:
    """Connect from ``source`` to 127.0.0.1:``port``, send ``payload``:
    (connected, what came back before the connection closed)."""
    ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5,
                                      bindAddress=(source, 0))
    p = Collect(payload)
    try:
        await endpoints.connectProtocol(ep, p)
    except Exception:
        return False, b""
    p.done.addTimeout(10, reactor)
    return p.made, await p.done


def audit(dep: Deployment) -> list[dict[str, Any]]:
    with open(dep.path("proxy_audit")) as f:
        return [json.loads(line) for line in f if line.strip()]


class PathwayTests(TestCase):
    timeout = 120

    async def start(self, lease_ports: int = 1) -> None:
        self.echo = EchoFactory()
        echo_port = reactor.listenTCP(0, self.echo, interface="127.0.0.1")
        self.addCleanup(echo_port.stopListening)
        first = free_port()
        self.lease_port = first
        addresses = Addresses(vm_host=f"127.0.0.1:{echo_port.getHost().port}",
                              lease_ports=f"{first}-{first + lease_ports - 1}")
        dep = self.dep = Deployment(os.path.abspath(self.mktemp()), addresses)
        dep.ca()
        dep.feed_secret()
        self.key, _ = dep.user_key("alice")
        dep.rest_ini()
        await dep.init(admin_runner(), "alice")
        dep.addresses.rest_port = free_port()  # the proxy's rest_url names it
        self.proxy = await dep.start_proxy(starter(self))
        await RestEnv(dep, "alice", self.key).start_here(self)
        self.vm_id = await self.add_vm("vm1")
        self.client = await self.login()

    async def add_vm(self, name: str) -> str:
        vm_id, token = await self.dep.add_vm(admin_runner(), "alice", name)
        anon = RestClient(reactor, self.dep.addresses.rest_url, self.dep.ca_file)
        await anon.enroll(token, identity.public_text(identity.generate()), FINGERPRINT)
        return vm_id

    async def login(self) -> RestClient:
        client = RestClient(reactor, self.dep.addresses.rest_url, self.dep.ca_file)
        await client.login("alice", self.key)
        return client

    async def pathway(self, client: RestClient, vm_id: str) -> dict[str, Any]:
        answer = await client.call("POST", f"/v1/vms/{vm_id}/pathways", {})
        return answer["pathway"]  # type: ignore[no-any-return]

    async def refused(self, coro: Any) -> RestError:
        try:
            await coro
        except RestError as e:
            return e
        self.fail("not refused")

    async def test_forward_refuse_delete(self) -> None:
        await self.start()
        p = await self.pathway(self.client, self.vm_id)
        self.assertEqual((p["vm"], p["port"], p["allowed"], p["proxy_host"],
                          p["tls_fingerprint"]),
                         (self.vm_id, self.lease_port, "127.0.0.1", "127.0.0.1", FINGERPRINT))
        self.assertEqual(await exchange(p["port"], b"hello through the lease"),
                         (True, b"hello through the lease"))
        self.assertEqual(self.echo.accepted, 1)
        # the same session, VM and address again: the live lease, at once
        self.assertEqual((await self.pathway(self.client, self.vm_id))["id"], p["id"])

        # another source address: closed before any byte, no connection onwards
        _, back = await exchange(p["port"], b"let me in", source="127.0.0.2")
        self.assertEqual(back, b"")
        self.assertEqual(self.echo.accepted, 1)
        refused = [e for e in audit(self.dep) if e["event"] == "lease-refused"]
        self.assertEqual([(e["peer"], e["port"], e["lease"]) for e in refused],
                         [("127.0.0.2", p["port"], p["id"])])

        # the range (one port) is exhausted
        vm2 = await self.add_vm("vm2")
        e = await self.refused(self.pathway(self.client, vm2))
        self.assertEqual((e.status, e.code), (503, "no-free-port"))

        listed = await self.client.call("GET", "/v1/pathways")
        self.assertEqual([x["id"] for x in listed["pathways"]], [p["id"]])
        await self.client.call("DELETE", f"/v1/pathways/{p['id']}")
        e = await self.refused(self.client.call("DELETE", f"/v1/pathways/{p['id']}"))
        self.assertEqual((e.status, e.code), (404, "no-such-pathway"))
        self.assertEqual(await exchange(p["port"], b"gone?"), (False, b""))
        self.assertEqual((await self.client.call("GET", "/v1/pathways"))["pathways"], [])
        # the freed port serves the next pathway
        p2 = await self.pathway(self.client, vm2)
        self.assertEqual(p2["port"], self.lease_port)
        self.assertEqual(await exchange(p2["port"], b"again"), (True, b"again"))
        closes = [e["reason"] for e in audit(self.dep) if e["event"] == "lease-close"]
        self.assertEqual(closes, ["closed"])

    async def test_survives_proxy_restart_and_ends_at_logout(self) -> None:
        await self.start()
        p = await self.pathway(self.client, self.vm_id)
        await self.proxy.stop()
        self.assertEqual(await exchange(p["port"], b"down"), (False, b""))
        self.proxy = await self.dep.start_proxy(starter(self))
        self.assertEqual(await exchange(p["port"], b"back after restart"),
                         (True, b"back after restart"))
        restored = [e for e in audit(self.dep) if e["event"] == "lease-open"]
        self.assertEqual([e.get("restored") for e in restored], [None, True])
        # another user of the same machine still cannot use it
        self.assertEqual((await exchange(p["port"], b"x", source="127.0.0.2"))[1], b"")
        await self.client.logout()
        self.assertEqual(await exchange(p["port"], b"after logout"), (False, b""))
        closes = [e["reason"] for e in audit(self.dep) if e["event"] == "lease-close"]
        self.assertEqual(closes, ["session-ended"])

    async def test_other_user_cannot_close(self) -> None:
        await self.start()
        p = await self.pathway(self.client, self.vm_id)
        bob_key = await self.dep.add_user(admin_runner(), "bob")
        bob = RestClient(reactor, self.dep.addresses.rest_url, self.dep.ca_file)
        await bob.login("bob", bob_key)
        e = await self.refused(bob.call("DELETE", f"/v1/pathways/{p['id']}"))
        self.assertEqual((e.status, e.code), (404, "no-such-pathway"))
        self.assertEqual((await bob.call("GET", "/v1/pathways"))["pathways"], [])
        self.assertEqual(await exchange(p["port"], b"still mine"), (True, b"still mine"))
