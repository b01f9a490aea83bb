"""Pathway leases at the proxy, with I/O: the Twisted side of
:mod:`ticrypt.proxy.ports`.

* :class:`LeaseService` owns the :class:`~ticrypt.proxy.ports.LeaseTable`,
  carries out its actions through an :class:`Opener`, audits
  (``lease-open``, ``lease-close`` with its reason, ``lease-refused``),
  runs the expiry timer and keeps the journal, so that leases survive a
  restart of the proxy: they are re-opened on the same ports at start.
* :class:`UserspaceOpener` (``[leases] mode = userspace``): one Twisted
  listener per lease, a :class:`~ticrypt.forward.ForwardFactory` whose
  ``admit`` asks the table.  A connection from any address but the lease's is
  aborted as it is accepted: before any byte is read or forwarded and
  before any outbound connection is made.
* The kernel mode's opener (``mode = nft``) is
  :class:`ticrypt.proxy.nftleases.NftOpener`.
* :class:`LeaseJournal`: the live leases as one JSON file, rewritten
  atomically (:func:`ticrypt.fsutil.atomic_write`) on every change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from ticrypt.audit import AuditLog
from ticrypt.encoding import loads_bounded
from ticrypt.forward import ForwardFactory, host_of
from ticrypt.fsutil import atomic_write
from ticrypt.proxy.ports import Close, Lease, LeaseError, LeaseTable, Open
from ticrypt.service import StartupError
from ticrypt.timers import cancel_call

#: A port that could not be bound is not handed out again for this long.
BLOCK_FOR = 60.0
#: Largest journal read at start.
MAX_JOURNAL = 16 * 1024 * 1024


class OpenFailed(Exception):
    """A lease's listener (or rule) could not be made on its port; ``str()``
    says why.  The port is set aside for a while and the next one tried."""


class BadTarget(OpenFailed):
    """The lease's target cannot be carried (whatever the port): refused
    at once with LeaseError ``bad-target``."""


class Opener(Protocol):
    """Makes and removes what carries a lease's traffic."""

    service: LeaseService | None

    async def start(self) -> None:
        """The service starts (before leases are restored); OpenFailed
        stops the daemon with one line."""

    async def open(self, lease: Lease) -> None:
        """Start carrying ``lease``; OpenFailed if it cannot."""

    async def close(self, lease: Lease) -> None:
        """Stop carrying ``lease`` (and end its connections)."""

    async def stop(self) -> None:
        """The service stops: remove everything (leases stay journaled)."""

    def active(self, lease: Lease) -> int:
        """Connections of ``lease`` open now (0 where they cannot be seen)."""


class LeaseJournal:
    """The live leases in the JSON file ``path`` (0600)."""

    log = Logger()

    def __init__(self, path: str):
        self.path = path

    def load(self) -> list[Any]:
        """The journaled records ([] if there is no file; a garbled file is
        logged and ignored: its leases are lost, never half-restored)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_JOURNAL + 1)
        except FileNotFoundError:
            return []
        try:
            if len(raw) > MAX_JOURNAL:
                raise ValueError("too large")
            obj = loads_bounded(raw, max_size=MAX_JOURNAL)
            if not isinstance(obj, dict) or not isinstance(obj.get("leases"), list):
                raise ValueError("not a lease journal")
        except ValueError as e:
            self.log.warn("lease journal {path} ignored: {why}", path=self.path, why=str(e))
            return []
        return list(obj["leases"])

    def save(self, records: list[dict[str, Any]]) -> None:
        atomic_write(self.path, json.dumps({"leases": records}, separators=(",", ":"),
                                           sort_keys=True).encode(), 0o600)


class LeaseService(Service):
    """Leases: the table, its opener, timer, audit and journal."""

    log = Logger()

    def __init__(self, *, table: LeaseTable, opener: Opener, clock: Any, audit: AuditLog,
                 journal: LeaseJournal | None, public_host: str,
                 new_id: Callable[[], str] | None = None):
        self.table = table
        self.opener = opener
        self.public_host = public_host
        self._clock = clock
        self._audit = audit
        self._journal = journal
        self._new_id = new_id or (lambda: "ls-" + os.urandom(12).hex())
        self._timer: IDelayedCall | None = None
        self._stopping = False
        #: fires once the opener has started and the journal's leases are
        #: re-opened; fails with a StartupError if the opener cannot start
        #: (the role's extra_ready)
        self.ready: defer.Deferred[None] = defer.Deferred()

    # ------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if self.ready.called:
            self.ready = defer.Deferred()
        d = defer.ensureDeferred(self._start())
        d.addCallbacks(self.ready.callback, self.ready.errback)

    async def _start(self) -> None:
        try:
            await self.opener.start()
        except OpenFailed as e:
            raise StartupError(str(e), "leases", "mode") from None
        if self._journal is not None:
            try:
                await self._restore(self._journal.load())
            except Exception:
                self.log.failure("restoring leases failed")

    async def _restore(self, records: list[Any]) -> None:
        actions, dropped = self.table.restore(records, self._clock.seconds())
        if dropped:
            self.log.info("lease journal: {n} expired or unusable leases dropped", n=dropped)
        for action in actions:
            assert isinstance(action, Open)
            try:
                await self.opener.open(action.lease)
            except OpenFailed as e:
                self.log.warn("lease {id} on port {port} not restored: {why}",
                              id=action.lease.id, port=action.lease.port, why=str(e))
                await self._carry_out(self.table.release(action.lease.id, "open-failed"))
                continue
            self._audit.write("lease-open", **_fields(action.lease), restored=True)
        self._changed()

    def stopService(self) -> Any:
        super().stopService()
        self._stopping = True
        cancel_call(self._timer)
        self._timer = None
        # The leases stay in the table and the journal: a restart re-opens them.
        return defer.ensureDeferred(self.opener.stop())

    # ------------------------------------------------------------ operations

    def get(self, lease_id: str) -> Lease | None:
        return self.table.get(lease_id)

    def leases(self, user: str | None = None) -> list[Lease]:
        return self.table.leases(user)

    async def open(self, *, user: str, session: str, vm: str, target: str, address: str,
                   expires: float) -> tuple[Lease, bool]:
        """A lease (and whether it is an existing one); LeaseError."""
        await self._expire()
        tries = min(8, self.table.ports[1] - self.table.ports[0] + 1)
        for _ in range(tries):
            now = self._clock.seconds()
            lease, actions = self.table.request(
                user=user, session=session, vm=vm, target=target, address=address,
                expires=expires, now=now, new_id=self._new_id)
            if not actions:
                self._changed()
                return lease, True
            # a replaced lease's listener is gone before its port may be bound again
            await self._carry_out([a for a in actions if isinstance(a, Close)])
            try:
                await self.opener.open(lease)
            except BadTarget as e:
                self.table.release(lease.id, "open-failed")
                raise LeaseError("bad-target", str(e)) from None
            except OpenFailed as e:
                self.log.warn("lease port {port} unusable: {why}", port=lease.port, why=str(e))
                self.table.release(lease.id, "open-failed")
                self.table.block(lease.port, now + BLOCK_FOR)
                continue
            self._audit.write("lease-open", **_fields(lease))
            self._changed()
            return lease, False
        raise LeaseError("no-free-port", "no port of the range could be opened; retry later")

    def close(self, lease_id: str, reason: str, user: str | None = None) -> bool:
        actions = self.table.release(lease_id, reason, user=user)
        self._spawn(self._carry_out(actions))
        return bool(actions)

    def close_session(self, session: str, reason: str) -> int:
        actions = self.table.close_session(session, reason)
        self._spawn(self._carry_out(actions))
        return len(actions)

    def revoke(self, users: Any, sessions: Any) -> int:
        """Close the leases of disabled ``users`` and ended ``sessions`` (the
        revocation feed's lists)."""
        actions = self.table.close_where(lambda lease: lease.user not in users, "user-revoked")
        actions += self.table.close_where(lambda lease: lease.session not in sessions,
                                          "session-ended")
        self._spawn(self._carry_out(actions))
        return len(actions)

    def activity(self, lease_id: str) -> None:
        """A connection of ``lease_id`` opened, failed or closed."""
        lease = self.table.get(lease_id)
        if lease is not None:
            self.table.set_connections(lease_id, self.opener.active(lease),
                                       self._clock.seconds())
            self._schedule()

    def refused(self, port: int, peer: str, lease_id: str | None, reason: str) -> None:
        """A connection to ``port`` from ``peer`` was refused (audited)."""
        self._audit.write("lease-refused", peer=peer, port=port, lease=lease_id,
                          reason=reason)

    # ------------------------------------------------------------ internals

    def _spawn(self, coro: Any) -> None:
        d = defer.ensureDeferred(coro)
        d.addErrback(lambda f: self.log.failure("closing leases failed", f))

    async def _carry_out(self, actions: list[Any]) -> None:
        for action in actions:
            assert isinstance(action, Close)
            if action.reason != "open-failed":
                self._audit.write("lease-close", **_fields(action.lease),
                                  reason=action.reason)
            await self.opener.close(action.lease)
        if actions:
            self._changed()

    async def _expire(self) -> None:
        now = self._clock.seconds()
        for lease in self.table.leases():
            self.table.set_connections(lease.id, self.opener.active(lease), now)
        await self._carry_out(self.table.expire(now))

    def _changed(self) -> None:
        if self._journal is not None:
            try:
                self._journal.save(self.table.snapshot())
            except OSError as e:
                self.log.error("cannot write the lease journal {path}: {why}",
                               path=self._journal.path, why=e.strerror)
        self._schedule()

    def _schedule(self) -> None:
        if self._stopping:
            return
        deadline = self.table.next_deadline()
        cancel_call(self._timer)
        self._timer = None
        if deadline is not None:
            delay = max(0.0, deadline - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._spawn(self._expire())
        self._schedule()


def _fields(lease: Lease) -> dict[str, Any]:
    """A lease's audit fields (no secrets)."""
    return {"lease": lease.id, "user": lease.user, "session": lease.session, "vm": lease.vm,
            "port": lease.port, "allowed": lease.allowed, "target": lease.target,
            "expires": int(lease.expires)}


# ---------------------------------------------------------------- userspace mode

def _split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


class UserspaceOpener:
    """One TCP listener per lease on ``interface``, a
    :class:`~ticrypt.forward.ForwardFactory` whose ``admit`` asks the table
    whether the peer is the address of the port's current lease (so a
    refusal happens in ``buildProtocol``: no byte read or forwarded, no
    outbound connection)."""

    log = Logger()

    def __init__(self, *, reactor: Any, interface: str, connect_timeout: float,
                 idle_timeout: float | None = None, max_connections: int | None = None):
        self._reactor = reactor
        self._interface = interface
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self.service: LeaseService | None = None
        self._ports: dict[str, tuple[IListeningPort, ForwardFactory]] = {}

    def _factory(self, lease: Lease) -> ForwardFactory:
        service = self.service
        assert service is not None
        lease_id, port = lease.id, lease.port

        def target() -> Any:
            current = service.table.get(lease_id)
            host, target_port = _split_target((current or lease).target)
            return endpoints.HostnameEndpoint(self._reactor, host, target_port,
                                              timeout=self._connect_timeout)

        def admit(addr: IAddress) -> str | None:
            current = service.table.admits(port, host_of(addr) or "")
            return None if current is not None and current.id == lease_id \
                else "source address not allowed"

        def on_event(name: str, **fields: Any) -> None:
            if name == "refused":
                service.refused(port, str(fields.get("peer", "")), lease_id,
                                str(fields.get("reason", "")))
            else:
                service.activity(lease_id)

        return ForwardFactory(target, clock=self._reactor,
                              connect_timeout=self._connect_timeout,
                              idle_timeout=self._idle_timeout, admit=admit,
                              on_event=on_event, max_connections=self._max_connections)

    async def start(self) -> None:
        pass

    def active(self, lease: Lease) -> int:
        entry = self._ports.get(lease.id)
        return len(entry[1].active()) if entry is not None else 0

    async def open(self, lease: Lease) -> None:
        assert self.service is not None
        factory = self._factory(lease)
        try:
            port = self._reactor.listenTCP(lease.port, factory, interface=self._interface)
        except error.CannotListenError as e:
            raise OpenFailed(f"cannot listen on port {lease.port}: "
                             f"{getattr(e.socketError, 'strerror', e.socketError)}") from None
        self._ports[lease.id] = (port, factory)

    async def close(self, lease: Lease) -> None:
        entry = self._ports.pop(lease.id, None)
        if entry is None:
            return
        port, factory = entry
        factory.close_all("lease closed")
        await defer.maybeDeferred(port.stopListening)

    async def stop(self) -> None:
        for lease_id in list(self._ports):
            port, factory = self._ports.pop(lease_id)
            factory.close_all("proxy stopping")
            try:
                await defer.maybeDeferred(port.stopListening)
            except Exception:
                self.log.failure("stopping a lease listener failed", Failure())
