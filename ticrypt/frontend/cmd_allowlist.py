"""``ticrypt allowlist``: the license servers VMs may reach (superadmin).

    ticrypt allowlist add NAME --port P [--port P] [--udp] [--comment C]
    ticrypt allowlist list
    ticrypt allowlist remove ID|NAME

A NAME is a DNS name (or ``*.`` and a name); rest keeps it in IDNA A-label
form, so a non-ASCII name must be typed as its punycode (``xn--``).
``remove NAME`` removes every entry of that name (one per protocol).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ticrypt.frontend.runner import CommandError, add_command, load_config, run_async, show

if TYPE_CHECKING:
    from ticrypt.frontend.client import RestClient

# What a command needs to run is imported in its functions (ticrypt.frontend.commands).

ENTRY_ID = re.compile(r"al-[0-9a-f]{16}\Z")


def _port(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1..65535: {port}")
    return port


def register(subparsers: Any) -> None:
    allow = subparsers.add_parser(
        "allowlist", help="license servers VMs may reach (superadmin)").add_subparsers(
        dest="allowlist_command", required=True, metavar="COMMAND")
    p = add_command(allow, "add", cmd_add, "allow VMs to reach NAME on the given ports",
                    with_json=True)
    p.add_argument("name", metavar="NAME",
                   help="DNS name (punycode for non-ASCII), or *.NAME for every name under it")
    p.add_argument("--port", dest="ports", type=_port, action="append", required=True,
                   metavar="P", help="a port (repeat for more, at most 32)")
    p.add_argument("--udp", action="store_true", help="UDP instead of TCP")
    p.add_argument("--comment", default="", help="why (shown in the list, at most 200 chars)")
    add_command(allow, "list", cmd_list, "list the allow-list", with_json=True)
    p = add_command(allow, "remove", cmd_remove, "remove an entry by id, or every entry "
                    "of a name")
    p.add_argument("entry", metavar="ID|NAME")


def _lines(entries: list[dict[str, Any]]) -> Iterator[str]:
    yield f"{'ID':<20} {'NAME':<32} {'PROTO':<5} {'PORTS':<24} COMMENT"
    for e in entries:
        ports = ",".join(str(p) for p in e["ports"])
        yield f"{e['id']:<20} {e['name']:<32} {e['protocol']:<5} {ports:<24} {e['comment']}"


def cmd_add(args: argparse.Namespace) -> int:
    from ticrypt import dnsname
    from ticrypt.frontend.client import authenticated_client

    cfg = load_config(args)
    what = f"allowlist add {args.name} failed"
    try:
        dnsname.canonical_name(args.name)
    except ValueError as e:
        raise CommandError(what, f"{args.name!r} {e}") from None

    async def run(reactor: Any) -> int:
        client = authenticated_client(reactor, cfg)
        entry = await client.add_allowlist(args.name, sorted(set(args.ports)),
                                           "udp" if args.udp else "tcp", args.comment)
        return show(args, entry, lambda e: [
            f"added {e['id']}: {e['name']} {e['protocol']} "
            f"{','.join(str(p) for p in e['ports'])}"])

    return run_async(what, run)


def cmd_list(args: argparse.Namespace) -> int:
    from ticrypt.frontend.client import authenticated_client

    cfg = load_config(args)

    async def run(reactor: Any) -> int:
        entries = await authenticated_client(reactor, cfg).list_allowlist()
        return show(args, {"entries": entries}, lambda r: _lines(r["entries"]))

    return run_async("allowlist list failed", run)


async def _targets(client: RestClient, ref: str) -> list[dict[str, Any]]:
    """The entries ``ref`` names: one id, or every entry of a name."""
    from ticrypt import dnsname

    if ENTRY_ID.match(ref):
        return [{"id": ref, "name": ref}]
    try:
        name = dnsname.canonical_name(ref)
    except ValueError as e:
        raise CommandError(f"allowlist remove {ref} failed", f"not an entry id or a name: {e}"
                           ) from None
    found = [e for e in await client.list_allowlist() if e["name"] == name]
    if not found:
        raise CommandError(f"allowlist remove {ref} failed", f"no entry for {name}")
    return found


def cmd_remove(args: argparse.Namespace) -> int:
    from ticrypt.frontend.client import RestError, authenticated_client

    cfg = load_config(args)
    what = f"allowlist remove {args.entry} failed"

    async def run(reactor: Any) -> int:
        client = authenticated_client(reactor, cfg)
        for entry in await _targets(client, args.entry):
            try:
                await client.remove_allowlist(entry["id"])
            except RestError as e:
                raise CommandError(what, str(e)) from None
            label = "" if entry["name"] == entry["id"] else f" ({entry['name']} " \
                f"{entry.get('protocol', '')})"
            print(f"removed {entry['id']}{label}")
        return 0

    return run_async(what, run)


__all__ = ["register"]
