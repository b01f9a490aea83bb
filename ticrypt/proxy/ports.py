"""The proxy's lease table (pathways): sans-IO, no reactor, no clock, no sockets.

A *lease* is one port of the configured range, opened for one user's
session towards one VM's host endpoint (``target``, ``HOST:PORT``), and
usable only from one source address (``allowed``, normalised:
IPv4-mapped IPv6 counts as IPv4).  The table allocates ports, enforces the
caps (per user, in total), decides reuse, expiry and idleness, and returns
*actions* (:class:`Open`, :class:`Close`) that the I/O layer
(:mod:`ticrypt.proxy.leases`) carries out: a listener or an nftables rule
per lease.

Rules worth stating:

* A port belongs to at most one lease; its allowed address is the lease's
  own, so a port freed and allocated again never keeps the old address.
* Freed ports go to the back of the free queue (least recently used first),
  so the port just released is the last one handed out again; a port the
  I/O layer could not bind is :meth:`LeaseTable.block`-ed for a while.
* A request for the same (session, VM, address) as a live lease returns that
  lease (its expiry refreshed) at once: a reconnecting client never sees
  "port still held"; from another address it replaces the session's lease
  to that VM (the client moved).
* A lease ends at its ``expires`` (the owner's session expiry), when idle
  (no open connection for ``idle_timeout``), or when closed (by request,
  by session, by user).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from ticrypt.config import Duration, Int, setting
from ticrypt.errors import CodedError


class LeaseError(CodedError):
    """A request was refused: ``code`` is stable (``no-free-port``,
    ``too-many-leases``, ``bad-address``, ``bad-request``), ``str()`` is one
    human line."""


def normalize_address(text: str) -> str:
    """``text`` as one canonical IP address string: IPv4-mapped IPv6
    (``::ffff:192.0.2.1``) becomes IPv4, IPv6 is compressed and lower case;
    LeaseError ``bad-address`` if it is not an IP address."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        raise LeaseError("bad-address", f"{text[:64]!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@attrs.frozen(kw_only=True)
class LeaseLimits:
    """The table's limits (keys of the proxy's ``[leases]``)."""

    idle_timeout: float = setting(Duration(min=1, max=30 * 86400), 600.0,
                                  "a lease with no open connection for this long ends")
    max_per_user: int = setting(Int(1, 100_000), 8, "live leases of one user")
    max_total: int = setting(Int(1, 1_000_000), 1000, "live leases in all")


@attrs.define
class Lease:
    """One lease; times are Unix seconds from the caller's clock."""

    id: str
    user: str
    session: str
    vm: str
    target: str
    allowed: str
    port: int
    created: float
    expires: float
    last_activity: float
    connections: int = 0

    def to_json(self) -> dict[str, Any]:
        """The journal record and the control API's view (no secrets)."""
        return {"id": self.id, "user": self.user, "session": self.session, "vm": self.vm,
                "target": self.target, "allowed": self.allowed, "port": self.port,
                "created": int(self.created), "expires": int(self.expires),
                "last_activity": int(self.last_activity)}

    @classmethod
    def from_json(cls, obj: Any) -> Lease:
        """A journal record; ValueError if it is malformed."""
        try:
            fields = {k: obj[k] for k in ("id", "user", "session", "vm", "target",
                                          "allowed")}
            times = {k: obj[k] for k in ("created", "expires", "last_activity")}
            port = obj["port"]
        except (KeyError, TypeError):
            raise ValueError("lease record is incomplete") from None
        if not all(isinstance(v, str) and v for v in fields.values()):
            raise ValueError("lease record has a bad field")
        if not all(isinstance(v, int | float) and not isinstance(v, bool)
                   for v in times.values()):
            raise ValueError("lease record has a bad time")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError("lease record has a bad port")
        return cls(id=fields["id"], user=fields["user"], session=fields["session"],
                   vm=fields["vm"], target=fields["target"], allowed=fields["allowed"],
                   port=port, created=float(times["created"]),
                   expires=float(times["expires"]),
                   last_activity=float(times["last_activity"]))


@attrs.frozen
class Open:
    """Open ``lease``'s listener (or rule)."""

    lease: Lease


@attrs.frozen
class Close:
    """Close ``lease``'s listener (or rule); ``reason`` is a short code
    (``closed``, ``idle``, ``expired``, ``session-ended``, ``user-revoked``,
    ``replaced``, ``stopped``, ``open-failed``)."""

    lease: Lease
    reason: str


Action = Open | Close


class LeaseTable:
    """Leases by id and by port, over ``ports`` (an inclusive (low, high))."""

    def __init__(self, ports: tuple[int, int], limits: LeaseLimits):
        low, high = ports
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")
        self.limits = limits
        self.ports = (low, high)
        self._free: deque[int] = deque(range(low, high + 1))
        self._blocked: dict[int, float] = {}
        self._by_id: dict[str, Lease] = {}
        self._by_port: dict[int, Lease] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._by_id

    # ------------------------------------------------------------ lookups

    def get(self, lease_id: str) -> Lease | None:
        return self._by_id.get(lease_id)

    def at_port(self, port: int) -> Lease | None:
        """The live lease of ``port``, if any: the one address it admits."""
        return self._by_port.get(port)

    def leases(self, user: str | None = None) -> list[Lease]:
        """Live leases (of ``user``), oldest first."""
        return sorted((lease for lease in self._by_id.values()
                       if user is None or lease.user == user),
                      key=lambda lease: (lease.created, lease.id))

    def admits(self, port: int, address: str) -> Lease | None:
        """The lease of ``port`` if ``address`` may use it, else None."""
        lease = self._by_port.get(port)
        if lease is None:
            return None
        try:
            return lease if normalize_address(address) == lease.allowed else None
        except LeaseError:
            return None

    # ------------------------------------------------------------ changes

    def request(self, *, user: str, session: str, vm: str, target: str, address: str,
                expires: float, now: float, new_id: Callable[[], str]) -> tuple[Lease, list[Action]]:
        """A lease for ``user``'s ``session`` to ``vm`` at ``target`` from
        ``address`` until ``expires``: the live one for the same (session,
        VM, address), refreshed, with no action; else a new one with an
        :class:`Open` action, after a :class:`Close` (``replaced``) of the
        session's lease to that VM from another address, if any (the
        caller carries the closes out first).  LeaseError when refused
        (nothing changed then)."""
        allowed = normalize_address(address)
        if expires <= now:
            raise LeaseError("bad-request", "the lease would already have expired")
        if not all((user, session, vm, target)):
            raise LeaseError("bad-request", "user, session, vm and target are required")
        mine = [lease for lease in self.leases()
                if (lease.user, lease.session, lease.vm) == (user, session, vm)]
        for lease in mine:
            if lease.allowed == allowed and lease.expires > now:
                lease.expires = expires
                lease.target = target
                lease.last_activity = now
                return lease, []
        # the session moved to another address (a reconnect): the old lease goes
        replaced: list[Action] = []
        for lease in mine:
            replaced += self.release(lease.id, "replaced")
        try:
            lease, opened = self._new(user=user, session=session, vm=vm, target=target,
                                      allowed=allowed, expires=expires, now=now, new_id=new_id)
        except LeaseError:
            for action in replaced:  # refused: the old lease stays as it was
                assert isinstance(action, Close)
                self._restore_lease(action.lease)
            raise
        return lease, replaced + opened

    def _restore_lease(self, lease: Lease) -> None:
        self._free.remove(lease.port)
        self._add(lease)

    def _new(self, *, user: str, session: str, vm: str, target: str, allowed: str,
             expires: float, now: float, new_id: Callable[[], str]) -> tuple[Lease, list[Action]]:
        if sum(1 for lease in self._by_id.values() if lease.user == user) \
                >= self.limits.max_per_user:
            raise LeaseError("too-many-leases", f"user {user} already holds "
                             f"{self.limits.max_per_user} pathways; close one first")
        if len(self._by_id) >= self.limits.max_total:
            raise LeaseError("no-free-port", "the proxy holds as many pathways as it may")
        port = self._take_port(now)
        lease_id = new_id()
        if lease_id in self._by_id:
            self._free.appendleft(port)
            raise LeaseError("bad-request", "lease id collision")
        lease = Lease(id=lease_id, user=user, session=session, vm=vm, target=target,
                      allowed=allowed, port=port, created=now, expires=expires,
                      last_activity=now)
        self._add(lease)
        return lease, [Open(lease)]

    def _take_port(self, now: float) -> int:
        for _ in range(len(self._free)):
            port = self._free.popleft()
            until = self._blocked.get(port)
            if until is not None and until > now:
                self._free.append(port)
                continue
            self._blocked.pop(port, None)
            return port
        low, high = self.ports
        raise LeaseError("no-free-port", f"every port of {low}-{high} is in use; "
                         "close a pathway or retry later")

    def _add(self, lease: Lease) -> None:
        self._by_id[lease.id] = lease
        self._by_port[lease.port] = lease

    def release(self, lease_id: str, reason: str = "closed",
                user: str | None = None) -> list[Action]:
        """End lease ``lease_id`` (only if it is ``user``'s, when given)."""
        lease = self._by_id.get(lease_id)
        if lease is None or (user is not None and lease.user != user):
            return []
        del self._by_id[lease_id]
        del self._by_port[lease.port]
        self._free.append(lease.port)
        return [Close(lease, reason)]

    def block(self, port: int, until: float) -> None:
        """Do not hand out ``port`` before ``until`` (it could not be bound)."""
        low, high = self.ports
        if low <= port <= high:
            self._blocked[port] = until

    def close_where(self, keep: Callable[[Lease], bool], reason: str) -> list[Action]:
        """End every lease for which ``keep`` is false."""
        actions: list[Action] = []
        for lease in self.leases():
            if not keep(lease):
                actions += self.release(lease.id, reason)
        return actions

    def close_session(self, session: str, reason: str = "session-ended") -> list[Action]:
        return self.close_where(lambda lease: lease.session != session, reason)

    def close_user(self, user: str, reason: str = "user-revoked") -> list[Action]:
        return self.close_where(lambda lease: lease.user != user, reason)

    def close_all(self, reason: str = "stopped") -> list[Action]:
        return self.close_where(lambda lease: False, reason)

    def connection_opened(self, lease_id: str, now: float) -> None:
        lease = self._by_id.get(lease_id)
        if lease is not None:
            lease.connections += 1
            lease.last_activity = now

    def connection_closed(self, lease_id: str, now: float) -> None:
        lease = self._by_id.get(lease_id)
        if lease is not None:
            lease.connections = max(0, lease.connections - 1)
            lease.last_activity = now

    def set_connections(self, lease_id: str, count: int, now: float) -> None:
        """``lease_id`` has ``count`` open connections (as the I/O layer
        counts them); a change is activity."""
        lease = self._by_id.get(lease_id)
        if lease is not None and lease.connections != count:
            lease.connections = max(0, count)
            lease.last_activity = now

    def touch(self, lease_id: str, now: float) -> None:
        """Activity seen on ``lease_id`` (bytes, where the I/O layer counts them)."""
        lease = self._by_id.get(lease_id)
        if lease is not None:
            lease.last_activity = now

    def _deadline(self, lease: Lease) -> float:
        if lease.connections:
            return lease.expires
        return min(lease.expires, lease.last_activity + self.limits.idle_timeout)

    def expire(self, now: float) -> list[Action]:
        """End the leases past their expiry (``expired``) or idle (``idle``)."""
        actions: list[Action] = []
        for lease in self.leases():
            if lease.expires <= now:
                actions += self.release(lease.id, "expired")
            elif self._deadline(lease) <= now:
                actions += self.release(lease.id, "idle")
        for port, until in list(self._blocked.items()):
            if until <= now:
                del self._blocked[port]
        return actions

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has work (None: no lease)."""
        return min((self._deadline(lease) for lease in self._by_id.values()), default=None)

    # ------------------------------------------------------------ persistence

    def snapshot(self) -> list[dict[str, Any]]:
        return [lease.to_json() for lease in self.leases()]

    def restore(self, records: Iterable[Any], now: float) -> tuple[list[Action], int]:
        """Take back journaled leases: an :class:`Open` for each live one
        whose port is in range and free; returns the actions and the number
        of records dropped (malformed, expired, out of range or conflicting)."""
        actions: list[Action] = []
        dropped = 0
        low, high = self.ports
        for record in records:
            try:
                lease = Lease.from_json(record)
                lease.allowed = normalize_address(lease.allowed)
            except (ValueError, LeaseError):
                dropped += 1
                continue
            if (lease.expires <= now or not low <= lease.port <= high
                    or lease.port in self._by_port or lease.id in self._by_id
                    or len(self._by_id) >= self.limits.max_total):
                dropped += 1
                continue
            # a restart counts as activity: the idle clock starts again
            lease.last_activity = now
            self._free.remove(lease.port)
            self._add(lease)
            actions.append(Open(lease))
        return actions, dropped
