"""``ticrypt tunnel open|list|close``: application ports of a VM on this
machine, through the local ticrypt-connect.

``tunnel open VM [--port REMOTE[:LOCAL]]...`` runs the whole set-up of
DESIGN.md 3.2:

1. rest opens a pathway: a proxy listener that admits only this machine's
   address, forwarding to the VM's host endpoint;
2. connect makes a TLS client key and certificate (the key stays there);
3. over the end-to-end encrypted channel the VM is told to accept that
   certificate (``tunnel-accept``); it answers the ports it tunnels and its
   own certificate's fingerprint;
4. connect starts the tunnel, pinning that fingerprint, and listens on one
   127.0.0.1 port per VM port.

It prints one line per port (``127.0.0.1:40123 -> labvm:8080``).  Without
``--port`` every port the VM tunnels is forwarded.  ``tunnel close`` also
closes the pathway when no other tunnel rides it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ticrypt.frontend.cmd_session import open_vm
from ticrypt.frontend.runner import CommandError, add_command, load_config, run_async, show

if TYPE_CHECKING:
    from ticrypt.frontend.client import RestClient
    from ticrypt.frontend.clientconfig import ClientConfig
    from ticrypt.frontend.vmref import VmRef

# What a command needs to run is imported in its functions (ticrypt.frontend.commands).

#: connect answers at once, but ``wait`` covers a TCP + TLS connection.
CONNECT_TIMEOUT = 60.0
_PORT_SPEC = re.compile(r"([0-9]{1,5})(?::([0-9]{1,5}))?")


def register(subparsers: Any) -> None:
    tunnel = subparsers.add_parser("tunnel", help="VM ports on this machine").add_subparsers(
        dest="tunnel_command", required=True, metavar="COMMAND")
    p = add_command(tunnel, "open", cmd_open, "forward a VM's ports to 127.0.0.1", vm="VM",
                    with_json=True,
                    description="Open a tunnel to VM through your ticrypt-connect and print "
                                "the local port of each VM port.")
    p.add_argument("--port", "-p", action="append", default=[], metavar="REMOTE[:LOCAL]",
                   help="VM port REMOTE on local port LOCAL (default: any free port); "
                        "repeat for more ports (default: every port the VM tunnels)")
    add_command(tunnel, "list", cmd_list, "list your tunnels", with_json=True)
    p = add_command(tunnel, "close", cmd_close, "close a tunnel")
    p.add_argument("tunnel_id", metavar="ID", help="the tunnel's id (ticrypt tunnel list)")


def parse_ports(specs: list[str]) -> list[tuple[int, int]]:
    """``REMOTE[:LOCAL]`` strings as (remote, local) pairs; CommandError."""
    out: list[tuple[int, int]] = []
    for spec in specs:
        m = _PORT_SPEC.fullmatch(spec.strip())
        remote = int(m.group(1)) if m else 0
        local = int(m.group(2) or 0) if m else -1
        if not m or not 1 <= remote <= 65535 or not 0 <= local <= 65535:
            raise CommandError("tunnel open", f"--port {spec!r}: expected REMOTE[:LOCAL], "
                               "ports 1..65535 (LOCAL 0: any free port)")
        out.append((remote, local))
    if len({r for r, _ in out}) != len(out):
        raise CommandError("tunnel open", "a VM port is given twice with --port")
    return out


class ConnectApi:
    """The local ticrypt-connect's API (:mod:`ticrypt.connect.api`)."""

    def __init__(self, reactor: Any, cfg: ClientConfig, timeout: float = CONNECT_TIMEOUT):
        from ticrypt.http.client import JsonClient

        self.url = cfg.connect.url
        self.token_file = cfg.connect_token_file()
        self._http = JsonClient(reactor, None, timeout=timeout)

    def _token(self) -> str:
        try:
            with open(self.token_file, encoding="ascii") as f:
                return f.read(512).strip()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CommandError("cannot use ticrypt-connect",
                               f"{self.token_file}: {why}; is it running? (twistd -n "
                               "ticrypt-connect --config connect.ini)") from None

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        from ticrypt.http.client import HttpError

        headers = {"Authorization": "Bearer " + self._token()}
        try:
            status, answer = await self._http.request(method, self.url + path, body, headers)
        except HttpError as e:
            raise CommandError("cannot use ticrypt-connect",
                               f"{e}; is it running at {self.url}?") from None
        if 200 <= status < 300 and isinstance(answer, dict):
            return answer
        err = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(err, dict):
            raise CommandError("ticrypt-connect refused", f"{err.get('message')} "
                               f"(HTTP {status} {err.get('code')})")
        raise CommandError("ticrypt-connect refused", f"HTTP {status}")


def _port_lines(tunnel: dict[str, Any], label: str) -> Iterator[str]:
    for f in tunnel.get("forwards", []):
        yield f"127.0.0.1:{f['local']} -> {label}:{f['remote']}"


def cmd_open(args: argparse.Namespace) -> int:
    from ticrypt.frontend.client import RestError, authenticated_client
    from ticrypt.frontend.vmref import resolve_vm

    wanted = parse_ports(args.port)
    cfg = load_config(args)
    what = f"cannot open a tunnel to {args.vm_id}"

    async def run(reactor: Any) -> int:
        connect = ConnectApi(reactor, cfg)
        await connect.call("GET", "/v1/tunnels")  # is it there, before rest acts
        rest = authenticated_client(reactor, cfg)
        ref = await resolve_vm(rest, args.vm_id)
        try:
            pathway = await rest.create_pathway(ref.id)
            proxy_host, proxy_port = str(pathway["proxy_host"]), int(pathway["port"])
            pathway_id = str(pathway["id"])
        except RestError as e:
            raise CommandError(what, f"rest refused the pathway: {e}") from None
        except (KeyError, TypeError, ValueError):
            raise CommandError(what, "rest answered the pathway without its "
                               "proxy_host, port and id") from None
        try:
            return await _set_up(reactor, cfg, args, connect, ref, wanted, what,
                                 pathway_id, proxy_host, proxy_port)
        except BaseException:
            # no tunnel rides the new pathway: close it (best effort)
            await _release_pathway(reactor, cfg, connect, pathway_id)
            raise

    return run_async(what, run)


async def _set_up(reactor: Any, cfg: ClientConfig, args: argparse.Namespace,
                  connect: ConnectApi, ref: VmRef, wanted: list[tuple[int, int]], what: str,
                  pathway_id: str, proxy_host: str, proxy_port: int) -> int:
    """Steps 2 to 4 of :func:`cmd_open`, once the pathway is open."""
    cert = await connect.call("POST", "/v1/certs", {})
    grant = await _accept(reactor, cfg, ref.id, str(cert["cert"]), what)
    ports = [int(p) for p in grant.get("ports", []) if isinstance(p, int)]
    fingerprint = grant.get("tls_fingerprint")
    if not isinstance(fingerprint, str):
        raise CommandError(what, "the VM answered tunnel-accept without its "
                           "tls_fingerprint")
    if not ports:
        raise CommandError(what, f"{ref.label} tunnels no ports")
    not_tunneled = [r for r, _ in wanted if r not in ports]
    if not_tunneled:
        raise CommandError(what, f"{ref.label} does not tunnel port "
                           f"{', '.join(map(str, not_tunneled))}; it tunnels "
                           f"{', '.join(map(str, sorted(ports)))}")
    forwards = wanted or [(p, 0) for p in sorted(ports)]
    answer = await connect.call("POST", "/v1/tunnels", {
        "vm": ref.id, "name": ref.label, "proxy_host": proxy_host,
        "proxy_port": proxy_port, "cert": cert["id"], "fingerprint": fingerprint,
        "forwards": [{"remote": r, "local": loc} for r, loc in forwards],
        "pathway": pathway_id, "wait": True})
    tunnel = answer["tunnel"]
    return show(args, tunnel, lambda t: [
        *_port_lines(t, ref.label),
        f"tunnel {t['id']} to {ref.label} is {t['state']}; close it with: "
        f"ticrypt tunnel close {t['id']}"])


async def _accept(reactor: Any, cfg: ClientConfig, vm_id: str, pem: str,
                  what: str) -> dict[str, Any]:
    """``tunnel-accept`` over the encrypted channel: the VM's grant."""
    from ticrypt.frontend.errors import RemoteError, SessionError

    _, session, _ = await open_vm(reactor, cfg, vm_id)
    try:
        return await session.request("tunnel-accept", cert=pem)
    except RemoteError as e:
        raise CommandError(what, f"the VM refused the certificate: {e.code}: "
                           f"{e.message}") from None
    except SessionError as e:
        raise CommandError(what, str(e)) from None
    finally:
        if session.is_open:
            await session.close()


def _size(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ..."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def cmd_list(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def run(reactor: Any) -> int:
        answer = await ConnectApi(reactor, cfg).call("GET", "/v1/tunnels")

        def lines(result: dict[str, Any]) -> Iterator[str]:
            yield (f"{'ID':<14} {'VM':<20} {'STATE':<11} {'STREAMS':>7} {'IN':>10} "
                   f"{'OUT':>10}  PORTS")
            for t in result["tunnels"]:
                ports = ", ".join(f"{f['local']}->{f['remote']}" for f in t["forwards"])
                yield (f"{t['id']:<14} {str(t.get('name') or t['vm']):<20} "
                       f"{t['state']:<11} {t['streams']:>7} {_size(t['bytes_in']):>10} "
                       f"{_size(t['bytes_out']):>10}  {ports}")
                if t.get("last_error") and t["state"] != "up":
                    yield f"{'':<14} last error: {t['last_error']}"
        return show(args, answer, lines)

    return run_async("tunnel list failed", run)


def cmd_close(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    what = f"cannot close tunnel {args.tunnel_id}"

    async def run(reactor: Any) -> int:
        connect = ConnectApi(reactor, cfg)
        tunnel = (await connect.call("DELETE", f"/v1/tunnels/{args.tunnel_id}"))["tunnel"]
        pathway = tunnel.get("pathway")
        note = ""
        if isinstance(pathway, str):
            note = await _release_pathway(reactor, cfg, connect, pathway)
        print(f"closed tunnel {tunnel['id']} to {tunnel.get('name') or tunnel['vm']}{note}")
        return 0

    return run_async(what, run)


async def _release_pathway(reactor: Any, cfg: ClientConfig, connect: ConnectApi,
                           pathway: str) -> str:
    """Close rest's pathway unless another tunnel rides it; a note for the
    user (closing it is a courtesy: it also ends at its idle timeout)."""
    from ticrypt.frontend.client import RestError, authenticated_client
    from ticrypt.frontend.clientconfig import NotLoggedIn

    try:
        others = (await connect.call("GET", "/v1/tunnels"))["tunnels"]
    except CommandError:  # connect is gone: no tunnel of it rides the pathway
        others = []
    if any(t.get("pathway") == pathway for t in others):
        return ""
    try:
        rest: RestClient = authenticated_client(reactor, cfg)
        await rest.delete_pathway(pathway)
    except (RestError, NotLoggedIn) as e:
        return f" (its pathway stays open until it times out: {e})"
    return ""


__all__ = ["ConnectApi", "parse_ports", "register"]
