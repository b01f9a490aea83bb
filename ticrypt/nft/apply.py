"""Applying nft transactions: an :class:`INft` interface, :class:`SpawnNft`
(runs ``nft -f -`` through the injected reactor) and :class:`MemoryNft` for
tests, plus :class:`OwnedTable`, the install/remove lifecycle of one table,
and :class:`OwnedTableService`, the service that deletes it on stop.

Failures are :class:`NftError` with one line a user can act on (the missing
binary, or nft's own stderr), never a traceback.
"""

from __future__ import annotations

import os
import shutil

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from ticrypt.audit import AuditLog
from ticrypt.nft.ruleset import Table, render_delete, render_replace
from ticrypt.timers import cancel_call

__all__ = ["INft", "MemoryNft", "NftError", "OwnedTable", "OwnedTableService", "SpawnNft"]

#: stdout/stderr kept from one nft run
MAX_OUTPUT = 16 * 1024


class NftError(Exception):
    """nft could not be run, or refused the ruleset.  ``str()`` is the
    one-line message for the user."""


class INft(Interface):
    """Runs one ``nft -f`` transaction (atomic: all of it or none)."""

    def apply(script: str) -> defer.Deferred[None]:
        """Fires with ``None`` once applied, or fails with :class:`NftError`."""


class _NftProcess(ProcessProtocol):
    def __init__(self, script: bytes, done: defer.Deferred[None]) -> None:
        self._script = script
        self._done = done
        self.stderr = bytearray()
        self.timed_out = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._script)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        pass  # nft -f prints nothing on success; nothing we need

    def errReceived(self, data: bytes) -> None:
        room = MAX_OUTPUT - len(self.stderr)
        if room > 0:
            self.stderr += data[:room]

    def processEnded(self, reason: Failure) -> None:
        if self.timed_out:
            self._done.errback(NftError("nft did not finish in time"))
        elif reason.check(error.ProcessDone):
            self._done.callback(None)
        else:
            code = getattr(reason.value, "exitCode", None)
            text = " ".join(self.stderr.decode("utf-8", "replace").split())
            self._done.errback(NftError(f"nft failed (exit {code}): {text or 'no message'}"))


@implementer(INft)
class SpawnNft:
    """Run ``nft -f -`` with the script on stdin."""

    log = Logger()

    def __init__(self, reactor: IReactorProcess, clock: IReactorTime, *,
                 nft: str = "nft", timeout: float = 30.0) -> None:
        self._reactor = reactor
        self._clock = clock
        self._nft = nft
        self._timeout = timeout

    def apply(self, script: str) -> defer.Deferred[None]:
        path = shutil.which(self._nft)
        if path is None:
            return defer.fail(NftError(
                f"{self._nft!r} not found: install nftables (the nft command) or use userspace mode"))
        done: defer.Deferred[None] = defer.Deferred()
        proto = _NftProcess(script.encode("utf-8"), done)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
        try:
            process: IProcessTransport = self._reactor.spawnProcess(
                proto, path, [path, "-f", "-"], env=env)
        except OSError as e:
            return defer.fail(NftError(f"cannot run {path}: {e.strerror or e}"))
        timer: IDelayedCall = self._clock.callLater(self._timeout, self._kill, proto, process)

        def stop_timer(result: object) -> object:
            cancel_call(timer)
            return result

        done.addBoth(stop_timer)
        return done

    def _kill(self, proto: _NftProcess, process: IProcessTransport) -> None:
        proto.timed_out = True
        try:
            process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


@implementer(INft)
class MemoryNft:
    """Records scripts and keeps a table-level view of the state, for tests.

    ``fail_next`` makes the next apply fail with that message, as nft would
    (nothing applied)."""

    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.tables: dict[str, str] = {}  # table head -> script that declared it
        self.fail_next: str | None = None

    def apply(self, script: str) -> defer.Deferred[None]:
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            return defer.fail(NftError(message))
        self.scripts.append(script)
        for line in script.splitlines():
            if line.startswith("delete table "):
                self.tables.pop(line[len("delete "):], None)
            elif line.startswith("table ") and line.endswith(" {"):
                self.tables[line[:-2]] = script
        return defer.succeed(None)


class OwnedTable:
    """One table a role owns: ``install`` replaces it atomically (a second
    install of the same value runs nothing), ``remove`` deletes it."""

    log = Logger()

    def __init__(self, nft: INft) -> None:
        self._nft = nft
        self._installed: Table | None = None

    @property
    def installed(self) -> Table | None:
        return self._installed

    async def install(self, table: Table) -> None:
        if table == self._installed:
            return
        if self._installed is not None and self._installed.head() != table.head():
            await self.remove()
        await self._nft.apply(render_replace(table))
        self._installed = table
        self.log.info("nft: installed {table}", table=table.head())

    async def remove(self) -> None:
        table = self._installed
        if table is not None:
            await self._nft.apply(render_delete(table))
            self._installed = None
            self.log.info("nft: removed {table}", table=table.head())


class OwnedTableService(Service):
    """A role's service that owns the nft table named ``table`` (installed
    through ``self._table`` by the subclass): stop deletes it and audits
    ``nft-removed``, or logs why it could not (stop never fails)."""

    log = Logger()

    def __init__(self, nft: INft, audit: AuditLog, *, role: str, table: str) -> None:
        self._table = OwnedTable(nft)
        self._audit = audit
        self._role = role
        self._table_name = table

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        d = defer.ensureDeferred(self._table.remove())

        def removed(_: None) -> None:
            self._audit.write("nft-removed", table=self._table_name)

        def failed(failure: Failure) -> None:
            self.log.error("{role}: could not remove table {table}: {why}", role=self._role,
                           table=self._table_name, why=failure.getErrorMessage())

        d.addCallbacks(removed, failed)
        return d
