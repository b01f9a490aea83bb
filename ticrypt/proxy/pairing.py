"""The proxy's pairing table: sans-IO, no reactor, no clock, no transport.

VM sockets that authenticated wait in a FIFO per VM id; a user socket that
presented a valid ticket takes the oldest waiting socket of its VM, or waits
itself (FIFO per VM) until one arrives.  The table enforces the limits and
counts the pairs; the websocket layer (:mod:`ticrypt.proxy.ws`) does the I/O
and tells the table when sockets go away.

Sockets are opaque hashable objects to the table.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

import attrs

from ticrypt.config import Int, setting

S = TypeVar("S", bound=Hashable)


@attrs.frozen
class Limits:
    """The table's limits (keys of the proxy's ``[limits]``); all must be >= 1."""

    max_waiting_per_vm: int = setting(
        Int(1, 100_000), 8, "VM sockets waiting per VM id (also: users waiting per VM id)")
    max_waiting_total: int = setting(
        Int(1, 10_000_000), 10000,
        "all waiting sockets together, VM sockets and users waiting for a VM")
    max_pairs: int = setting(Int(1, 10_000_000), 10000, "pairs relaying at the same time")


@attrs.frozen
class Paired(Generic[S]):
    """A VM socket and a user socket were joined; the caller starts relaying."""

    vm_id: str
    vm: S
    user: S


@attrs.frozen
class Waiting:
    """The socket was queued."""

    depth: int


@attrs.frozen
class Refused:
    """Over a limit; ``reason`` is a short human line (no secrets)."""

    reason: str


class PairingTable(Generic[S]):
    """Waiting VM sockets and users per VM id, and the count of live pairs."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # dicts keep insertion order: FIFO with O(1) removal of a dead socket
        self._vms: dict[str, dict[S, None]] = {}
        self._users: dict[str, dict[S, None]] = {}
        self._waiting_total = 0
        self.pairs = 0

    # -- queries ---------------------------------------------------------------

    @property
    def waiting_total(self) -> int:
        """VM sockets plus users currently waiting."""
        return self._waiting_total

    def depth(self, vm_id: str) -> int:
        """How many VM sockets of ``vm_id`` are waiting (the VM's pool depth)."""
        return len(self._vms.get(vm_id, ()))

    def users_waiting(self, vm_id: str) -> int:
        return len(self._users.get(vm_id, ()))

    def waiting_users(self) -> list[S]:
        """Every user waiting for a VM socket (a copy: safe to remove from)."""
        return [sock for queue in self._users.values() for sock in queue]

    def snapshot(self) -> dict[str, int]:
        """``{vm_id: waiting VM sockets}`` for every VM with at least one."""
        return {vm: len(q) for vm, q in sorted(self._vms.items()) if q}

    # -- events ----------------------------------------------------------------

    def add_vm(self, vm_id: str, sock: S) -> Paired[S] | Waiting | Refused:
        """An authenticated VM socket arrives: pair it with the oldest waiting
        user of its VM, or queue it."""
        users = self._users.get(vm_id)
        if users and self.pairs < self.limits.max_pairs:
            user = next(iter(users))
            self._take(self._users, vm_id, user)
            self.pairs += 1
            return Paired(vm_id, sock, user)
        return self._queue(self._vms, vm_id, sock, "waiting sockets")

    def add_user(self, vm_id: str, sock: S) -> Paired[S] | Waiting | Refused:
        """A user with a valid ticket for ``vm_id`` arrives: take the oldest
        waiting VM socket, or queue the user."""
        if self.pairs >= self.limits.max_pairs:
            return Refused(f"too many pairs (max {self.limits.max_pairs})")
        vms = self._vms.get(vm_id)
        if vms:
            vm = next(iter(vms))
            self._take(self._vms, vm_id, vm)
            self.pairs += 1
            return Paired(vm_id, vm, sock)
        return self._queue(self._users, vm_id, sock, "users waiting")

    def remove_vm(self, vm_id: str, sock: S) -> bool:
        """A waiting VM socket went away; True if it was waiting."""
        return self._take(self._vms, vm_id, sock)

    def remove_user(self, vm_id: str, sock: S) -> bool:
        """A waiting user gave up or timed out; True if it was waiting."""
        return self._take(self._users, vm_id, sock)

    def pair_ended(self) -> list[Paired[S]]:
        """A pair finished.  Returns pairs that the freed slot allows (a user
        and a VM socket that waited only because ``max_pairs`` was reached)."""
        if self.pairs <= 0:
            raise RuntimeError("pair_ended without a pair")
        self.pairs -= 1
        formed: list[Paired[S]] = []
        for vm_id in list(self._users):
            while (self.pairs < self.limits.max_pairs and self._users.get(vm_id)
                   and self._vms.get(vm_id)):
                user = next(iter(self._users[vm_id]))
                vm = next(iter(self._vms[vm_id]))
                self._take(self._users, vm_id, user)
                self._take(self._vms, vm_id, vm)
                self.pairs += 1
                formed.append(Paired(vm_id, vm, user))
        return formed

    def _queue(self, table: dict[str, dict[S, None]], vm_id: str, sock: S,
               what: str) -> Waiting | Refused:
        """Queue ``sock`` last in ``table``'s queue of ``vm_id`` (``what`` it
        holds, for the refusal) unless the queue or all queues are full."""
        queue = table.get(vm_id, {})
        if len(queue) >= self.limits.max_waiting_per_vm:
            return Refused(f"too many {what} for this VM "
                           f"(max {self.limits.max_waiting_per_vm})")
        if self._waiting_total >= self.limits.max_waiting_total:
            return Refused(f"too many waiting sockets (max {self.limits.max_waiting_total})")
        table[vm_id] = queue
        queue[sock] = None
        self._waiting_total += 1
        return Waiting(len(queue))

    def _take(self, table: dict[str, dict[S, None]], vm_id: str, sock: S) -> bool:
        queue = table.get(vm_id)
        if queue is None or sock not in queue:
            return False
        del queue[sock]
        if not queue:
            del table[vm_id]
        self._waiting_total -= 1
        return True
