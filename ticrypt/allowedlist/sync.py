"""Keeps the ``inet ticrypt_allowedlist`` table in step with the entries
and the upstream addresses, and tells the DNS responder which names the
firewall admits (the :class:`~ticrypt.allowedlist.dns.Admitter`).

Each allowed name gets one stable forwarding address from the
``forward_addresses`` pool (:class:`ForwardingPool`; a wildcard entry's
names are added as VMs ask for them, at most ``max_names_per_wildcard``).
The table (:func:`build_table`, a pure function):

* ``prerouting`` (nat): from ``vm_networks`` to a forwarding address on one
  of its entry's ports/protocol -> DNAT to the license server's address
  (the first of its current set; the set is ordered stably);
* ``forward`` (filter): established/related accepted; DNATed flows of an
  entry accepted; everything else from ``vm_networks`` routed through this
  host is logged to NFLOG group ``log_group`` (when not 0) and dropped;
* ``postrouting`` (nat, when ``masquerade``): DNATed flows from the VMs
  leave with this host's address, so license servers need no route back.

Order: a name is answered only after the table that admits it is
installed; a name that loses access stops being answered *before* the
narrower table is installed.

Live connections: the DNAT of a connection is decided by its first packet
and kept by conntrack for the connection's life, and ``ct state
established,related accept`` comes before the drop, so a connection opened
while its rule existed keeps flowing after the upstream address expired or
the entry was removed, until it ends (or conntrack times it out:
``nf_conntrack_tcp_timeout_established``, 5 days by default).  We rely on
conntrack being on (it is whenever a nat table exists) and on nobody
flushing it (``conntrack -F`` would end them).

:class:`StateFile` keeps the entries, the forwarding addresses and the
last good upstream addresses in ``state_dir``, so a restart answers the
same addresses and installs the same rules (in one atomic ``nft -f``
transaction: the old table stays in the kernel until the new one replaces
it, and stopping the daemon leaves the table in place).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from ticrypt.allowedlist.policy import Entry, Policy, parse_entry
from ticrypt.allowedlist.upstream import AddressBook, Lookup
from ticrypt.fsutil import atomic_write
from ticrypt.nft.apply import NftError, OwnedTable
from ticrypt.nft.ruleset import Chain, NamedSet, Rule, Table
from ticrypt.service import start_loop, stop_loop

__all__ = ["ForwardingPool", "Route", "StateFile", "Sync", "build_table"]

STATE_FILE = "allowedlist-state.json"
MAX_STATE = 16 * 1024 * 1024


class ForwardingPool:
    """Stable forwarding addresses from CIDR blocks (network and broadcast
    addresses of IPv4 blocks are skipped; the first address is too: it is
    usually the backend's own)."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self.assigned: dict[str, str] = {}

    def _candidates(self) -> Iterable[str]:
        for net in self.networks:
            hosts = net.hosts() if net.num_addresses > 2 else iter(net)
            for i, ip in enumerate(hosts):
                if i == 0 and net.num_addresses > 4:
                    continue
                yield str(ip)

    def contains(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip.version == n.version and ip in n for n in self.networks)

    def assign(self, name: str) -> str | None:
        if name in self.assigned:
            return self.assigned[name]
        used = set(self.assigned.values())
        for a in self._candidates():
            if a not in used:
                self.assigned[name] = a
                return a
        return None

    def keep_only(self, names: Iterable[str]) -> None:
        keep = set(names)
        self.assigned = {n: a for n, a in self.assigned.items() if n in keep}

    def load(self, saved: dict[str, Any]) -> None:
        used: set[str] = set()
        for name, a in saved.items():
            if isinstance(name, str) and isinstance(a, str) and a not in used:
                try:
                    if self.contains(a):
                        self.assigned[name] = a
                        used.add(a)
                except ValueError:
                    continue


@attrs.frozen
class Route:
    """One admitted name: forwarding address -> target, on ports/protocol."""

    name: str
    forward: str
    target: str
    ports: tuple[int, ...]
    protocol: str


def _fam(address: str) -> str:
    return "ip" if ipaddress.ip_address(address).version == 4 else "ip6"


def _comment(name: str) -> str:
    return name.replace("*", "_")[:120]


def _split(networks: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    return (tuple(str(n) for n in nets if n.version == 4),
            tuple(str(n) for n in nets if n.version == 6))


def build_table(name: str, vm_networks: Iterable[str], routes: Iterable[Route], *,
                log_group: int = 0, masquerade: bool = True,
                pool: Iterable[str] = ()) -> Table:
    """The whole table for ``routes`` (pure; render with
    :func:`ticrypt.nft.ruleset.render_replace`).

    ``pool``: the forwarding address blocks.  They are local addresses of
    the backend, so a VM's packet to one that no DNAT rule took (an unlisted
    port, a removed entry) would reach the backend's own services: the
    ``input`` chain drops (and logs) it."""
    v4, v6 = _split(vm_networks)
    p4, p6 = _split(pool)
    sets = (NamedSet("vm4", "ipv4_addr", v4, ("interval",)),
            NamedSet("vm6", "ipv6_addr", v6, ("interval",)),
            NamedSet("pool4", "ipv4_addr", p4, ("interval",)),
            NamedSet("pool6", "ipv6_addr", p6, ("interval",)))
    nat: list[Rule] = []
    accept: list[Rule] = []
    for r in sorted(routes, key=lambda r: (r.name, r.forward, r.protocol, r.ports)):
        fam = _fam(r.forward)
        if _fam(r.target) != fam:
            continue  # DNAT cannot change the IP version
        vm = "@vm4" if fam == "ip" else "@vm6"
        for port in r.ports:
            nat.append(Rule(f"{fam} saddr {vm} {fam} daddr {r.forward} {r.protocol} dport {port}"
                            f" dnat {fam} to {r.target}", _comment(r.name)))
            accept.append(Rule(f"{fam} saddr {vm} {fam} daddr {r.target} {r.protocol} dport {port}"
                               f" ct status dnat ct original {fam} daddr {r.forward} accept",
                               _comment(r.name)))
    forward = [Rule("ct state established,related accept"), *accept]
    local: list[Rule] = []
    for fam, vm, fwd in (("ip", "@vm4", "@pool4"), ("ip6", "@vm6", "@pool6")):
        if log_group:
            forward.append(Rule(f"{fam} saddr {vm} log group {int(log_group)}"))
            local.append(Rule(f"{fam} saddr {vm} {fam} daddr {fwd} log group {int(log_group)}"))
        forward.append(Rule(f"{fam} saddr {vm} drop"))
        local.append(Rule(f"{fam} saddr {vm} {fam} daddr {fwd} drop"))
    chains = [Chain("prerouting", tuple(nat), type="nat", hook="prerouting", priority=-100),
              Chain("forward", tuple(forward), type="filter", hook="forward", priority=0),
              Chain("input", tuple(local), type="filter", hook="input", priority=0)]
    if masquerade:
        chains.append(Chain("postrouting", (
            Rule("ip saddr @vm4 ct status dnat masquerade"),
            Rule("ip6 saddr @vm6 ct status dnat masquerade")),
            type="nat", hook="postrouting", priority=100))
    return Table(name, "inet", tuple(chains), sets)


class StateFile:
    """``allowedlist-state.json`` in ``state_dir`` (atomic writes)."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, STATE_FILE)

    def load(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_STATE + 1)
        except FileNotFoundError:
            return {}
        if len(data) > MAX_STATE:
            raise ValueError(f"{self.path}: larger than {MAX_STATE} bytes")
        value = json.loads(data)
        if not isinstance(value, dict):
            raise ValueError(f"{self.path}: not a JSON object")
        return value

    def save(self, value: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps(value, sort_keys=True, indent=1).encode() + b"\n")


class Resolver(Protocol):
    def resolve(self, name: str) -> defer.Deferred[Lookup]: ...


class Sync(Service):
    """Entries + upstream -> table installed -> names admitted."""

    log = Logger()

    def __init__(self, *, policy: Policy, pool: ForwardingPool, book: AddressBook,
                 resolver: Resolver, table: OwnedTable, clock: Any, table_name: str,
                 state: StateFile | None = None, log_group: int = 0, masquerade: bool = True,
                 max_names_per_wildcard: int = 16, wildcard_idle: float = 86400.0,
                 tick: float = 1.0,
                 audit: Callable[..., None] | None = None) -> None:
        self.policy, self.pool, self.book, self.resolver = policy, pool, book, resolver
        self.table, self.clock, self.table_name, self.state = table, clock, table_name, state
        self.log_group, self.masquerade = log_group, masquerade
        self.max_names_per_wildcard = max_names_per_wildcard
        self.wildcard_idle = wildcard_idle
        self.tick = tick
        self.audit = audit
        self.serial = -1
        #: wildcard names VMs asked for, by entry id
        self.wanted: dict[str, set[str]] = {}
        self._waiters: dict[str, list[defer.Deferred[None]]] = {}
        self._resolving: set[str] = set()
        self._failing: set[str] = set()
        self._running_sync: defer.Deferred[None] | None = None
        self._again = False
        self._loop: task.LoopingCall | None = None
        #: fires after the first install (the daemon's readiness)
        self.first: defer.Deferred[None] = defer.Deferred()
        self.installs = 0
        self.failure: str | None = None

    # -- state ----------------------------------------------------------------

    def restore(self) -> None:
        """Entries, forwarding addresses and last good upstream addresses
        from the state file (a damaged file is logged and ignored)."""
        if self.state is None:
            return
        try:
            saved = self.state.load()
            entries = []
            for raw in saved.get("entries", []):
                try:
                    entries.append(parse_entry(raw))
                except ValueError:
                    continue
            self.policy.set_entries(entries)
            self.serial = int(saved.get("serial", -1))
            self.pool.load(saved.get("forwarding", {}))
            self.book.load(saved.get("upstream", {}), self.clock.seconds())
            for ident, names in saved.get("wanted", {}).items():
                self.wanted[str(ident)] = {str(n) for n in names}
        except (ValueError, TypeError, AttributeError) as e:
            self.log.error("allowedlist: ignoring the saved state: {why}", why=str(e))

    def _save(self) -> None:
        if self.state is None:
            return
        value = {
            "serial": self.serial,
            "entries": [attrs.asdict(e) for e in self.policy.entries],
            "forwarding": dict(sorted(self.pool.assigned.items())),
            "upstream": self.book.to_json(),
            "wanted": {k: sorted(v) for k, v in sorted(self.wanted.items())},
        }
        try:
            self.state.save(value)
        except OSError as e:
            self.log.error("allowedlist: cannot save the state to {path}: {why}",
                           path=self.state.path, why=e.strerror or str(e))

    # -- inputs ---------------------------------------------------------------

    def set_entries(self, serial: int, entries: Iterable[Entry]) -> None:
        entries = list(entries)
        before = {e.id: e for e in self.policy.entries}
        self.policy.set_entries(entries)
        self.serial = serial
        after = {e.id: e for e in entries}
        if self.audit is not None:
            for ident in sorted(set(after) - set(before)):
                self.audit("allowlist-entry-added", id=ident, name=after[ident].name)
            for ident in sorted(set(before) - set(after)):
                self.audit("allowlist-entry-removed", id=ident, name=before[ident].name)
        self.kick()

    def wait(self, name: str, entry: Entry) -> defer.Deferred[None]:
        """The :class:`~ticrypt.allowedlist.dns.Admitter`: fires once
        ``name`` is admitted (or never: the caller's timer cancels)."""
        if entry.wildcard:
            names = self.wanted.setdefault(entry.id, set())
            if name not in names:
                if len(names) >= self.max_names_per_wildcard:
                    return defer.fail(RuntimeError("too many names for " + entry.name))
                names.add(name)
            self.policy.seen[name] = self.clock.seconds()
        waiters = self._waiters.setdefault(name, [])

        def cancel(d: defer.Deferred[None]) -> None:
            if d in waiters:
                waiters.remove(d)
            if not waiters:
                self._waiters.pop(name, None)

        d: defer.Deferred[None] = defer.Deferred(cancel)
        waiters.append(d)
        self.kick()
        return d

    # -- the loop -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = start_loop(self._tick, self.clock, self.tick, now=True)

    def stopService(self) -> defer.Deferred[None] | None:
        # the table stays in the kernel: a restart must not cut VMs off
        super().stopService()
        stop_loop(self._loop)
        self._loop = None
        return None

    def _tick(self) -> None:
        now = self.clock.seconds()
        narrowed = self.book.expire(now)
        if narrowed:
            self.log.warn("allowedlist: upstream addresses of {names} expired without a "
                          "fresh answer: their rules are removed", names=", ".join(narrowed))
        idle = self._forget_idle(now)
        self._resolve_due(now)
        if narrowed or idle or self.installs == 0:
            self.kick()

    def _forget_idle(self, now: float) -> bool:
        """Drop the wildcard names no VM asked for in ``wildcard_idle``
        seconds (they free their forwarding address and their place)."""
        seen = self.policy.seen
        dropped = False
        for names in self.wanted.values():
            for n in [n for n in names if now - seen.setdefault(n, now) >= self.wildcard_idle]:
                names.discard(n)
                seen.pop(n, None)
                dropped = True
        return dropped

    def names(self) -> dict[str, list[Entry]]:
        """Every name that should have routes now, with every entry that
        covers it (one per protocol; an exact entry and a wildcard both)."""
        entries = self.policy.entries
        names = {e.name for e in entries if not e.wildcard}
        for e in entries:
            if e.wildcard:
                names.update(n for n in self.wanted.get(e.id, ()) if e.covers(n))
        return {n: [e for e in entries if e.covers(n)] for n in sorted(names)}

    def _resolve_due(self, now: float) -> None:
        for name in self.book.due(self.names(), now):
            if name not in self._resolving:
                self._resolving.add(name)
                d = self.resolver.resolve(name)
                d.addCallbacks(self._resolved, self._unresolved, callbackArgs=(name,),
                               errbackArgs=(name,))
                d.addErrback(lambda f: self.log.failure("allowedlist: lookup", f))

    def _resolved(self, lookup: Lookup, name: str) -> None:
        self._resolving.discard(name)
        if name in self._failing:
            self._failing.discard(name)
            self.log.info("allowedlist: upstream answers for {name} again", name=name)
        own = [a for a in lookup.addresses if not self._ours(a)]
        if self.book.good(name, Lookup(tuple(own), lookup.ttl), self.clock.seconds()):
            self.kick()

    def _unresolved(self, failure: Any, name: str) -> None:
        self._resolving.discard(name)
        self.book.failed(name, self.clock.seconds())
        if name in self._failing:
            return  # logged once per outage
        self._failing.add(name)
        self.log.warn("allowedlist: upstream lookup of {name} failed ({why}); keeping its "
                      "last good addresses until they expire", name=name,
                      why=str(failure.value))

    def _ours(self, address: str) -> bool:
        """An upstream address inside the VM networks or the pool would let
        VMs reach each other or loop: never a target."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return True
        return self.policy.inside(str(ip)) or self.pool.contains(str(ip))

    def kick(self) -> None:
        """Sync soon (coalesced: one install at a time, one more after)."""
        if self._running_sync is not None:
            self._again = True
            return
        self._running_sync = defer.ensureDeferred(self._sync())

        def done(_: object) -> None:
            self._running_sync = None
            if self._again:
                self._again = False
                self.kick()

        self._running_sync.addErrback(lambda f: self.log.failure("allowedlist: sync", f))
        self._running_sync.addBoth(done)

    def routes(self) -> list[Route]:
        now = self.clock.seconds()
        names = self.names()
        self.pool.keep_only(names)
        self.book.forget(names)
        for ident in list(self.wanted):
            if ident not in {e.id for e in self.policy.entries}:
                del self.wanted[ident]
        out: list[Route] = []
        for name, covering in names.items():
            targets = self.book.current(name, now)
            forward = self.pool.assign(name)
            if not targets or forward is None:
                continue
            same = [t for t in targets if _fam(t) == _fam(forward)]
            if same:
                out.extend(Route(name, forward, same[0], e.ports, e.protocol) for e in covering)
        return out

    def table_for(self, routes: Iterable[Route]) -> Table:
        return build_table(self.table_name, [str(n) for n in self.policy.vm_networks], routes,
                           log_group=self.log_group, masquerade=self.masquerade,
                           pool=[str(n) for n in self.pool.networks])

    async def _sync(self) -> None:
        self._resolve_due(self.clock.seconds())
        routes = self.routes()
        admitted = {r.name: r.forward for r in routes}
        # narrow the answers first, widen them only after the install
        self.policy.admitted = {n: a for n, a in self.policy.admitted.items()
                                if admitted.get(n) == a}
        try:
            await self.table.install(self.table_for(routes))
        except NftError as e:
            if not self.first.called:
                self.failure = str(e)
                self.first.errback(e)  # the daemon's one start-up failure line
                return
            if self.failure != str(e):
                self.log.error("allowedlist: cannot install the nft table: {why}", why=str(e))
            self.failure = str(e)
            return
        self.failure = None
        self.installs += 1
        self.policy.admitted = admitted
        self._save()
        if not self.first.called:
            self.first.callback(None)
        for name in list(self._waiters):
            if name in admitted:
                for d in self._waiters.pop(name):
                    d.callback(None)
