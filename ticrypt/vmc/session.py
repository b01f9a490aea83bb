"""One established secure channel on the VM (PROTOCOL.md §5): the
dispatcher, the user's processes, the audit lines and the idle timer.

A :class:`VmSession` knows nothing of websockets or of the pool.  It sends
application messages through ``send_app`` and ends the channel through
``close``, as :class:`~ticrypt.vmc.processes.ProcessGroup` sends through
``send``; a revocation goes out through ``on_revoked``.  The websocket leg
(:class:`~ticrypt.vmc.leg.VmLeg`) feeds it the plaintext of each record and
tells it when the channel closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from ticrypt import closecodes, identity
from ticrypt.audit import AuditLog
from ticrypt.channel import app
from ticrypt.timers import cancel_call
from ticrypt.vmc import commands
from ticrypt.vmc.commands import Dispatcher, TunnelGate
from ticrypt.vmc.processes import ChannelTrack, ProcessGroup, RunAs
from ticrypt.vmc.processes import Send as SendApp
from ticrypt.vmc.state import VmState


@attrs.frozen
class Peer:
    """Who is at the other end of a channel, as the audit lines name them."""

    vm: str
    user: str
    client: str
    user_key: bytes | None = None

    @property
    def fingerprint(self) -> str:
        return identity.fingerprint(self.user_key) if self.user_key else ""


@attrs.define(eq=False)
class VmSession:
    """The application side of one established channel.

    ``reactor`` runs the children (``IReactorProcess``), ``clock`` the idle
    timer.  Call :meth:`start` once, :meth:`received` for each record's
    plaintext, :meth:`closing` when the channel starts to close and
    :meth:`closed` when it is gone."""

    peer: Peer
    state: VmState
    info: dict[str, Any]
    audit: AuditLog
    reactor: Any
    clock: Any
    run_as: RunAs
    track: ChannelTrack
    max_processes: int
    kill_grace: float
    idle_timeout: float
    send_app: SendApp
    close: Callable[[int, str], None]
    on_revoked: Callable[[bytes], None]
    #: pins certificates for ``tunnel-accept`` (None: tunnel disabled)
    tunnel: TunnelGate | None = None
    dispatcher: Dispatcher = attrs.field(init=False)
    group: ProcessGroup = attrs.field(init=False)
    _idle_timer: IDelayedCall | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        assert self.peer.user_key is not None
        self.dispatcher = Dispatcher(self.state, self.peer.user_key, self.info,
                                     max_processes=self.max_processes, tunnel=self.tunnel,
                                     user=self.peer.user)
        self.group = ProcessGroup(self.reactor, self.run_as, self.send_app,
                                  self.dispatcher.finished, self._stdin_consumed,
                                  kill_grace=self.kill_grace, track=self.track)

    def start(self) -> None:
        """The channel is established: audit it and start the idle timer."""
        p = self.peer
        assert p.user_key is not None
        self.audit.write("session-open", vm=p.vm, user=p.user, user_key=p.fingerprint,
                         client=p.client, owner=self.state.is_owner(p.user_key), result="ok")
        self._touch()

    # -- from the channel ------------------------------------------------------

    def received(self, plaintext: bytes) -> None:
        """The plaintext of one record: an application message."""
        self._touch()
        try:
            header, body = app.decode(plaintext)
        except app.AppError as e:
            self.send_app({"t": "error", "code": e.code, "message": e.message}, b"")
            return
        p, group = self.peer, self.group
        for action in self.dispatcher.handle(header, body):
            if isinstance(action, commands.Send):
                self.send_app(action.header, action.body)
            elif isinstance(action, commands.StartExec):
                self.audit.write("exec", vm=p.vm, user=p.user, user_key=p.fingerprint,
                                 command=action.argv[0][:200], result="started")
                group.start_exec(action.rid, action.argv, action.window)
            elif isinstance(action, commands.StartShell):
                self.audit.write("shell", vm=p.vm, user=p.user, user_key=p.fingerprint,
                                 result="started")
                group.start_shell(action.rid, action.term, action.rows, action.cols,
                                  action.window)
            elif isinstance(action, commands.Stdin):
                group.write_stdin(action.rid, action.data)
            elif isinstance(action, commands.Eof):
                group.eof(action.rid)
            elif isinstance(action, commands.Cancel):
                group.cancel(action.rid)
            elif isinstance(action, commands.Resize):
                group.resize(action.rid, action.rows, action.cols)
            elif isinstance(action, commands.Revoked):
                self.on_revoked(action.key)
            elif isinstance(action, commands.Violation):
                self._violation(action)
                return

    def closing(self) -> None:
        """The channel is closing: the children are signalled now, not when
        the close handshake ends (which the far end may delay), so a revoked
        user loses access at once."""
        self.group.close()

    def closed(self, code: int | None) -> None:
        """The channel is gone."""
        cancel_call(self._idle_timer)
        self.group.close()
        p = self.peer
        self.audit.write("session-closed", vm=p.vm, user=p.user, user_key=p.fingerprint,
                         client=p.client, code=code, result="closed")

    def when_empty(self) -> defer.Deferred[None]:
        """Fires once every child of this channel is gone."""
        return self.group.when_empty()

    # -- helpers ---------------------------------------------------------------

    def _touch(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.idle_timeout)
        else:
            self._idle_timer = self.clock.callLater(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        if self.group.count:
            self._touch()  # a running command is not idleness
            return
        self.close(closecodes.TIMEOUT.code, closecodes.reason(closecodes.TIMEOUT.name, "idle"))

    def _stdin_consumed(self, rid: int, n: int) -> None:
        """A child took ``n`` stdin bytes: the frontend may send that many more."""
        for action in self.dispatcher.consumed(rid, n):
            if isinstance(action, commands.Send):
                self.send_app(action.header, action.body)

    def _violation(self, v: commands.Violation) -> None:
        p = self.peer
        self.audit.write("session-error", vm=p.vm, user=p.user, user_key=p.fingerprint,
                         client=p.client, reason=v.code, result="closed")
        self.close(closecodes.CHANNEL_ERROR.code, closecodes.reason(v.code, v.message))
