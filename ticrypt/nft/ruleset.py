"""nftables rulesets as values, rendered to ``nft -f`` text by pure functions.

A role owns whole tables (``ticrypt_vmhost``, later ``ticrypt_isolation``,
``ticrypt_allowedlist``...).  :func:`render_replace` turns a :class:`Table`
into one transaction that creates the table if missing, deletes it, and
declares it afresh, so applying the same value twice gives the same kernel
state and nothing stale survives (a ``flush table`` would keep old chains
and sets).  :func:`render_delete` removes a table, absent or not.

Every value is checked here (names, addresses, ports, priorities); rule
statements are built by the helpers below (:func:`dnat`,
:func:`masquerade_to`), never from text a user typed, and rendering refuses
statement text that could end a statement or a block.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import attrs

__all__ = [
    "Chain",
    "Dnat",
    "NamedSet",
    "Rule",
    "Table",
    "dnat",
    "dnat_table",
    "masquerade_to",
    "render_delete",
    "render_replace",
]

FAMILIES = frozenset({"inet", "ip", "ip6"})
CHAIN_TYPES = frozenset({"filter", "nat", "route"})
HOOKS = frozenset({"prerouting", "input", "forward", "output", "postrouting"})
POLICIES = frozenset({"accept", "drop"})
SET_TYPES = frozenset({"ipv4_addr", "ipv6_addr", "inet_service", "ipv4_addr . inet_service"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
_COMMENT = re.compile(r"[A-Za-z0-9 _.,:/+=@-]{0,120}\Z")
_FORBIDDEN = re.compile(r"[;{}\n\r#\"]")


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"not an nftables name: {value!r}")
    return value


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port out of range: {value}")
    return value


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address; IPv4-mapped IPv6 counts as IPv4 (as in
    :func:`ticrypt.forward.normalize_host`, not imported: this module stays
    free of twisted.internet)."""
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _ipfam(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return "ip" if ip.version == 4 else "ip6"


def _hostport(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"


@attrs.frozen
class Rule:
    """One rule statement.  Build it with the helpers of this module."""

    statement: str
    comment: str | None = None

    def render(self) -> str:
        if not self.statement.strip() or _FORBIDDEN.search(self.statement):
            raise ValueError(f"unsafe rule statement: {self.statement!r}")
        if self.comment is None:
            return self.statement
        if not _COMMENT.match(self.comment):
            raise ValueError(f"unsafe rule comment: {self.comment!r}")
        return f'{self.statement} comment "{self.comment}"'


@attrs.frozen
class Chain:
    """A chain; a base chain when ``hook`` is given (with type and priority)."""

    name: str
    rules: tuple[Rule, ...] = ()
    type: str | None = None
    hook: str | None = None
    priority: int = 0
    policy: str = "accept"

    def render(self) -> list[str]:
        lines = [f"\tchain {_name(self.name)} {{"]
        if self.hook is not None:
            if self.type not in CHAIN_TYPES or self.hook not in HOOKS:
                raise ValueError(f"bad base chain {self.name}: type {self.type} hook {self.hook}")
            if self.policy not in POLICIES:
                raise ValueError(f"bad policy {self.policy!r}")
            lines.append(f"\t\ttype {self.type} hook {self.hook} priority {int(self.priority)};"
                         f" policy {self.policy};")
        lines.extend(f"\t\t{rule.render()}" for rule in self.rules)
        lines.append("\t}")
        return lines


@attrs.frozen
class NamedSet:
    """A named set (for allow-lists and isolation later)."""

    name: str
    type: str
    elements: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    def render(self) -> list[str]:
        if self.type not in SET_TYPES:
            raise ValueError(f"unsupported set type {self.type!r}")
        lines = [f"\tset {_name(self.name)} {{", f"\t\ttype {self.type};"]
        for flag in self.flags:
            if flag not in ("interval", "timeout", "constant"):
                raise ValueError(f"unsupported set flag {flag!r}")
        if self.flags:
            lines.append(f"\t\tflags {', '.join(self.flags)};")
        if self.elements:
            for element in self.elements:
                if _FORBIDDEN.search(element) or "," in element:
                    raise ValueError(f"unsafe set element {element!r}")
            lines.append(f"\t\telements = {{ {', '.join(self.elements)} }}")
        lines.append("\t}")
        return lines


@attrs.frozen
class Table:
    """A table owned by one role: replaced whole, deleted whole."""

    name: str
    family: str = "inet"
    chains: tuple[Chain, ...] = ()
    sets: tuple[NamedSet, ...] = ()

    def head(self) -> str:
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported family {self.family!r}")
        return f"table {self.family} {_name(self.name)}"


def render_replace(table: Table) -> str:
    """One transaction: create if missing, delete, declare afresh."""
    head = table.head()
    lines = [head, f"delete {head}", f"{head} {{"]
    for named_set in table.sets:
        lines.extend(named_set.render())
    for chain in table.chains:
        lines.extend(chain.render())
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_delete(table: Table) -> str:
    """Remove the table; applying this when it is absent is not an error."""
    head = table.head()
    return f"{head}\ndelete {head}\n"


# -- DNAT --------------------------------------------------------------------

@attrs.frozen
class Dnat:
    """TCP to ``dport`` (optionally only to ``daddr`` and/or from
    ``saddr``) goes to ``to_host:to_port``."""

    dport: int
    to_host: str
    to_port: int
    daddr: str | None = None
    saddr: str | None = None
    comment: str | None = None


def dnat(d: Dnat) -> Rule:
    """The prerouting/output rule for one :class:`Dnat`."""
    to = _ip(d.to_host)
    fam = _ipfam(to)
    matches: list[str] = []
    for key, value in (("saddr", d.saddr), ("daddr", d.daddr)):
        if value is None:
            continue
        ip = _ip(value)
        if ip.version != to.version:
            raise ValueError(f"{key} {value} and target {d.to_host} are different IP versions")
        matches.append(f"{fam} {key} {ip}")
    if d.daddr is None:
        # Only connections to this host, not traffic routed through it.
        matches.append("fib daddr type local")
    if not matches[0].startswith(fam + " "):
        # inet tables need the IP version stated before "dnat ip/ip6 to".
        matches.insert(0, f"meta nfproto {'ipv4' if to.version == 4 else 'ipv6'}")
    statement = (f"{' '.join(matches)} tcp dport {_port(d.dport)}"
                 f" dnat {fam} to {_hostport(to, _port(d.to_port))}")
    return Rule(statement, d.comment)


def masquerade_to(host: str, port: int) -> Rule:
    """Source-NAT (masquerade) DNATed traffic towards ``host:port``, so the
    target answers through us even without a route back to the client."""
    ip = _ip(host)
    fam = _ipfam(ip)
    return Rule(f"{fam} daddr {ip} tcp dport {_port(port)} ct status dnat masquerade")


def dnat_table(name: str, rules: Iterable[Dnat], *, masquerade: bool = False,
               local: bool = True) -> Table:
    """A table that DNATs: ``prerouting`` for traffic arriving from outside,
    ``output`` (when ``local``) for connections the host makes itself, and a
    ``postrouting`` masquerade per distinct target when ``masquerade``."""
    rules = tuple(rules)
    rendered = tuple(dnat(d) for d in rules)
    chains = [Chain("prerouting", rendered, type="nat", hook="prerouting", priority=-100)]
    if local:
        chains.append(Chain("output", rendered, type="nat", hook="output", priority=-100))
    if masquerade:
        targets = sorted({(str(_ip(d.to_host)), d.to_port) for d in rules},
                         key=lambda t: (_ip(t[0]).version, _ip(t[0]), t[1]))
        chains.append(Chain("postrouting", tuple(masquerade_to(h, p) for h, p in targets),
                            type="nat", hook="postrouting", priority=100))
    return Table(name, "inet", tuple(chains))
