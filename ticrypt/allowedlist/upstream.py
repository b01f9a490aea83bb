"""The license servers' real addresses, from the upstream resolvers.

* :class:`AddressBook` (sans-IO) keeps the last good addresses of each name
  until their TTL (clamped to ``[min_ttl, max_ttl]``) runs out, capped at
  ``max_addresses`` per name, and says when each name is due for a refresh
  (at 3/4 of its TTL, or ``retry`` seconds after a failure).  A failed
  lookup NEVER widens access: the last good set stays until it expires and
  then the name has no address (its rules go: access narrows).  A definite
  "no such name" (NXDOMAIN, or no address) narrows at once.
* :class:`DnsPythonResolver` asks the configured resolvers with dnspython in
  the reactor's thread pool (dnspython's resolver blocks); CNAME chains are
  followed by dnspython and the TTL is the chain's minimum.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger

__all__ = ["AddressBook", "DnsPythonResolver", "Lookup", "Resolved", "UpstreamError"]


class UpstreamError(Exception):
    """The resolvers did not give a definite answer (timeout, SERVFAIL...)."""


@attrs.frozen
class Lookup:
    """A definite answer: the addresses (maybe none) and their TTL."""

    addresses: tuple[str, ...]
    ttl: float


@attrs.frozen
class Resolved:
    addresses: tuple[str, ...]
    expires: float


class AddressBook:
    """Last good upstream addresses per name."""

    def __init__(self, *, max_addresses: int = 4, min_ttl: float = 30.0,
                 max_ttl: float = 86400.0, retry: float = 5.0) -> None:
        self.max_addresses, self.min_ttl, self.max_ttl = max_addresses, min_ttl, max_ttl
        self.retry = retry
        self.known: dict[str, Resolved] = {}
        self._due: dict[str, float] = {}

    def current(self, name: str, now: float) -> tuple[str, ...]:
        r = self.known.get(name)
        return r.addresses if r is not None and r.expires > now else ()

    def due(self, names: Iterable[str], now: float) -> list[str]:
        """The names to look up now (never looked up, or due)."""
        return [n for n in names if self._due.get(n, 0.0) <= now]

    def good(self, name: str, lookup: Lookup, now: float) -> bool:
        """Record a definite answer; whether the current addresses changed."""
        before = self.current(name, now)
        addrs: list[str] = []
        for a in lookup.addresses:
            try:
                ip = ipaddress.ip_address(a)
            except ValueError:
                continue
            if not (ip.is_unspecified or ip.is_multicast or ip.is_loopback) and str(ip) not in addrs:
                addrs.append(str(ip))
        # keep the addresses already in use first (stable DNAT targets), then the rest sorted
        ordered = [a for a in before if a in addrs] + sorted(a for a in addrs if a not in before)
        ttl = min(self.max_ttl, max(self.min_ttl, lookup.ttl))
        chosen = tuple(ordered[:self.max_addresses])
        if chosen:
            self.known[name] = Resolved(chosen, now + ttl)
        else:
            self.known.pop(name, None)
        self._due[name] = now + ttl * 0.75
        return chosen != before

    def failed(self, name: str, now: float) -> None:
        """A lookup failed: keep the last good set; try again after ``retry``."""
        self._due[name] = now + self.retry

    def expire(self, now: float) -> list[str]:
        """Forget expired sets; the names whose access narrowed."""
        gone = [n for n, r in self.known.items() if r.expires <= now]
        for n in gone:
            del self.known[n]
        return gone

    def forget(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for table in (self.known, self._due):
            for n in [n for n in table if n not in keep]:
                del table[n]

    def to_json(self) -> dict[str, Any]:
        return {n: {"addresses": list(r.addresses), "expires": r.expires}
                for n, r in sorted(self.known.items())}

    def load(self, data: Mapping[str, Any], now: float) -> None:
        """Unexpired sets of a saved :meth:`to_json` (bad items skipped)."""
        for name, item in data.items():
            try:
                addrs = tuple(str(ipaddress.ip_address(a)) for a in item["addresses"])
                expires = float(item["expires"])
            except (KeyError, TypeError, ValueError):
                continue
            if expires > now and addrs:
                self.known[name] = Resolved(addrs[:self.max_addresses], expires)


def parse_servers(text: Iterable[str]) -> list[tuple[str, int]]:
    """``host`` or ``host:port`` / ``[v6]:port`` items as (address, port)."""
    out = []
    for item in text:
        item = item.strip()
        host, port = item, 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 53
        elif item.count(":") == 1:
            host, p = item.split(":")
            port = int(p)
        ipaddress.ip_address(host)
        if not 1 <= port <= 65535:
            raise ValueError(f"port out of range in {item!r}")
        out.append((host, port))
    return out


class DnsPythonResolver:
    """A and AAAA of a name from ``servers`` (dnspython, in threads)."""

    log = Logger()

    def __init__(self, reactor: Any, servers: list[tuple[str, int]], *,
                 timeout: float = 5.0, families: tuple[str, ...] = ("A", "AAAA")) -> None:
        self._reactor = reactor
        self._servers = servers
        self._timeout = timeout
        self._families = families

    def resolve(self, name: str) -> defer.Deferred[Lookup]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                         self._resolve, name)

    def _resolve(self, name: str) -> Lookup:
        import dns.exception
        import dns.nameserver
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in self._servers]
        resolver.lifetime = self._timeout
        resolver.timeout = min(2.0, self._timeout)
        addresses: list[str] = []
        ttls: list[float] = []
        for rdtype in self._families:
            try:
                answer = resolver.resolve(name + ".", rdtype, raise_on_no_answer=False,
                                          search=False)
            except dns.resolver.NXDOMAIN:
                return Lookup((), 0.0)
            except dns.exception.DNSException as e:
                raise UpstreamError(f"{name} {rdtype}: {type(e).__name__}") from None
            if answer.rrset is None:
                continue
            ttls.append(float(answer.chaining_result.minimum_ttl))
            addresses.extend(r.to_text() for r in answer.rrset)
        return Lookup(tuple(addresses), min(ttls) if ttls else 0.0)
