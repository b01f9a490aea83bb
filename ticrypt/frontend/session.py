"""Frontend side of a secure session with a VM, through the proxy.

::

    session = await open_session(reactor, proxy_url, ca_file, ticket, user_key,
                                 vm_id, vm_public_key)
    info = await session.info()
    cmd = session.exec(["sh", "-c", "echo hi"], stdin=b"", on_stdout=out.write)
    status = await cmd.done
    await session.close()

:func:`open_session` opens the websocket leg (:mod:`ticrypt.frontend.leg`):
it presents the ticket, waits for ``paired`` and runs the user end of the
secure channel (:class:`~ticrypt.channel.UserChannel`), which refuses a VM
whose key differs from ``vm_public_key`` (what rest registered).  Then a
:class:`ChannelSession` multiplexes requests over it (PROTOCOL.md §5), talking
to the leg only through :class:`Leg`.  Every failure is a
:class:`~ticrypt.frontend.errors.SessionError` with a stable ``code`` and
one human line.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ticrypt import closecodes, identity
from ticrypt.channel import app
from ticrypt.frontend.errors import RemoteError, SessionError, remote_error
from ticrypt.frontend.leg import UserLeg, open_leg
from ticrypt.timers import cancel_call

__all__ = ["CANCEL_WAIT", "ChannelSession", "Command", "Leg", "RemoteError",
           "SessionError", "open_session"]

Output = Callable[[bytes], None]
OnWarning = Callable[[RemoteError], None]

#: Seconds a cancelled command may take to report its end before the
#: frontend stops waiting (vmc ends it after ``[exec] kill_grace``, 3 s by
#: default, even if an escaped process holds its output open).
CANCEL_WAIT = 15.0

#: The close reason of a session the user ends (PROTOCOL.md §1.2).
BYE = "bye"


class Leg(Protocol):
    """What a ChannelSession needs of its websocket (:class:`~ticrypt.frontend.leg.UserLeg`)."""

    @property
    def ended(self) -> SessionError | None:
        """Why the connection ended or is ending; None while usable."""

    @property
    def transport(self) -> Any:
        """The websocket's transport (to register an input producer on)."""

    @property
    def peer_key(self) -> bytes:
        """The VM's key as verified in the handshake."""

    def send_app(self, header: dict[str, Any], body: bytes = b"") -> None:
        """Send one application message to the VM."""

    def close(self, code: int, reason: str) -> None:
        """Close the websocket."""


@implementer(IPushProducer)
class _InputGate:
    """Stands in for a local input source as the websocket's producer: the
    source runs only while nothing holds it, neither a full websocket
    (``socket``) nor an exhausted stdin window (``window``)."""

    def __init__(self, source: IPushProducer):
        self._source = source
        self._holds: set[str] = set()

    def hold(self, reason: str) -> None:
        held = bool(self._holds)
        self._holds.add(reason)
        if not held:
            self._source.pauseProducing()

    def release(self, reason: str) -> None:
        if reason in self._holds:
            self._holds.discard(reason)
            if not self._holds:
                self._source.resumeProducing()

    def pauseProducing(self) -> None:
        self.hold("socket")

    def resumeProducing(self) -> None:
        self.release("socket")

    def stopProducing(self) -> None:
        self._source.stopProducing()


class Command:
    """A running ``exec`` or ``shell`` on the VM.

    ``done`` fires with the exit status (or fails with a RemoteError);
    ``started`` fires when the VM accepted it (shell: its ``ok``; exec: at once).
    Once the VM accepted it (its ``ok``), the request ends only with its
    ``exit``: an ``error`` about a stream message (a refused ``resize``) or
    a reused id is a warning (PROTOCOL.md §5 Errors), given to
    ``on_warning`` (default: logged).

    Input (:meth:`write`, :meth:`eof`) is sent within the request's window:
    nothing before the VM's ``ok`` announces it, then only as much as the VM
    has acknowledged with ``window`` messages; the rest waits here
    (:attr:`pending`).
    """

    log = Logger()

    def __init__(self, session: ChannelSession, rid: int, kind: str, on_stdout: Output | None,
                 on_stderr: Output | None, on_warning: OnWarning | None = None):
        self._session = session
        self.rid = rid
        self.kind = kind
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.on_warning = on_warning
        self.done: defer.Deferred[int] = defer.Deferred()
        self.started: defer.Deferred[None] = defer.Deferred()
        self.finished = False
        #: The VM's ``ok`` came: the request runs until its ``exit``.
        self.accepted = False
        #: stdin body bytes sent so far.
        self.sent = 0
        self._credit = 0  # bytes the VM will take now
        self._record = app.CHUNK  # most stdin bytes per record (set by the VM's ok)
        self._queue: deque[memoryview | None] = deque()  # None: an eof
        self._queued = 0
        self._eof = False
        self._gate: _InputGate | None = None
        self._cancelled = False
        self._cancel_timer: IDelayedCall | None = None

    @property
    def pending(self) -> int:
        """stdin bytes written but not sent yet (waiting for window)."""
        return self._queued

    def write(self, data: bytes) -> None:
        """Send stdin bytes (split into records, within the window)."""
        if self.finished or self._eof or not data:
            return
        self._queue.append(memoryview(bytes(data)))
        self._queued += len(data)
        self._flush()

    def eof(self) -> None:
        """exec: end of input (once); shell: the terminal's ^D."""
        if self.finished or self._eof:
            return
        self._eof = self.kind == "exec"
        self._queue.append(None)
        self._flush()

    def attach_input(self, source: IPushProducer) -> IPushProducer:
        """Pause ``source`` (a local input such as the CLI's stdin reader)
        while this command's window is exhausted, resume it on credit.

        Returns the producer to register with the websocket's transport in
        place of ``source``, so that a full websocket pauses it too.
        """
        self._gate = _InputGate(source)
        if self._queue:
            self._gate.hold("window")
        return self._gate

    def _flush(self) -> None:
        while self._queue and not self.finished:
            item = self._queue[0]
            if item is None:
                if self.kind == "shell":  # the VM counts a shell's ^D as one byte
                    if self._credit < 1:
                        break
                    self._credit -= 1
                self._queue.popleft()
                self._session._send({"t": "eof", "id": self.rid})
                continue
            n = min(len(item), self._credit, self._record)
            if n == 0:
                break
            if n == len(item):
                self._queue.popleft()
                body = item.obj if isinstance(item.obj, bytes) and len(item.obj) == n \
                    else bytes(item)
            else:
                self._queue[0] = item[n:]
                body = bytes(item[:n])
            self._credit -= n
            self._queued -= n
            self.sent += n
            self._session._send({"t": "stdin", "id": self.rid}, body)
        if self._gate is not None:
            if self._queue:
                self._gate.hold("window")
            else:
                self._gate.release("window")

    def cancel(self, wait: float = CANCEL_WAIT) -> None:
        """Ask the VM to end the command (SIGTERM; SIGKILL and the end after
        its ``kill_grace``, PROTOCOL.md §5).  ``done`` fires with the status
        the VM reports.  If none comes within ``wait`` seconds, or on a
        second call, stop waiting: ``done`` fails with ``cancelled``."""
        if self.finished:
            return
        if self._cancelled:
            self._give_up("cancelled: stopped waiting for the VM to end the command")
            return
        self._cancelled = True
        self._session._send({"t": "cancel", "id": self.rid})
        self._cancel_timer = self._session._clock.callLater(
            wait, self._give_up, f"cancelled: the VM did not report the end of the "
            f"command within {wait:g}s; it may still be running")

    def _give_up(self, message: str) -> None:
        self._finish(None, SessionError("cancelled", message))

    def resize(self, rows: int, cols: int) -> None:
        if not self.finished and self.kind == "shell":
            self._session._send({"t": "resize", "id": self.rid, "rows": rows, "cols": cols})

    def _deliver(self, header: dict[str, Any], body: bytes) -> None:
        t = header["t"]
        if t == "stdout" and self.on_stdout is not None:
            self.on_stdout(body)
        elif t == "stderr" and self.on_stderr is not None:
            self.on_stderr(body)
        elif t == "window":
            self._credit += app.window_size(header.get("bytes")) or 0
            self._flush()
        elif t == "ok":
            self.accepted = True
            self._credit = app.window_size(header.get("window")) or app.WINDOW
            # records of a quarter of the window (64 KiB to 256 KiB): up to
            # four in flight, each record's cost spread over as many bytes
            # as the window allows
            self._record = min(app.MAX_BODY, max(app.CHUNK, self._credit // 4))
            if not self.started.called:
                self.started.callback(None)
            self._flush()
        elif t == "exit":
            status = header.get("status")
            self._finish(status if isinstance(status, int) else 255, None)
        elif t == "error":
            err = remote_error(header)
            if not self.accepted:  # it answers the req: the request failed
                self._finish(None, err)
            elif self.on_warning is not None:
                self.on_warning(err)
            else:
                self.log.warn("the VM refused a message of request {rid}: {code}: {message}",
                              rid=self.rid, code=err.code, message=err.message)

    def _finish(self, status: int | None, err: SessionError | None) -> None:
        if self.finished:
            return
        self.finished = True
        cancel_call(self._cancel_timer)
        self._queue.clear()
        self._queued = 0
        self._session._requests.pop(self.rid, None)
        if not self.started.called:
            if err is not None:
                self.started.errback(err)
                self.started.addErrback(lambda f: None)
            else:
                self.started.callback(None)
        if err is not None:
            self.done.errback(err)
        else:
            assert status is not None
            self.done.callback(status)


class _Pending:
    def __init__(self) -> None:
        self.d: defer.Deferred[dict[str, Any]] = defer.Deferred()

    def _deliver(self, header: dict[str, Any], body: bytes) -> None:
        if self.d.called:
            return
        if header["t"] == "ok":
            self.d.callback(header)
        elif header["t"] == "error":
            self.d.errback(remote_error(header))

    def _finish(self, status: int | None, err: SessionError | None) -> None:
        if not self.d.called and err is not None:
            self.d.errback(err)


class ChannelSession:
    """An established secure channel to one VM; requests multiplex over it.

    ``clock`` times requests out (``request_timeout``) and bounds the wait
    for a cancelled command; ``vm_key`` is the VM's key as verified in the
    handshake.
    """

    log = Logger()

    def __init__(self, leg: Leg, clock: IReactorTime, *, request_timeout: float = 60.0):
        self._leg = leg
        self._clock = clock
        self._request_timeout = request_timeout
        self._next_id = 1
        self._requests: dict[int, Command | _Pending] = {}
        self.closed: defer.Deferred[SessionError | None] = defer.Deferred()

    @property
    def transport(self) -> Any:
        """The websocket's transport (to register an input producer on)."""
        return self._leg.transport

    @property
    def is_open(self) -> bool:
        """Neither ended by a failure nor closed."""
        return self._leg.ended is None

    @property
    def vm_key(self) -> bytes:
        """The VM's key as verified in the handshake."""
        return self._leg.peer_key

    def _rid(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    def _send(self, header: dict[str, Any], body: bytes = b"") -> None:
        self._leg.send_app(header, body)

    def _check_open(self) -> None:
        if self._leg.ended is not None:
            raise self._leg.ended

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request/answer (``info``, ``users``, ``authorize``, ``revoke``)."""
        self._check_open()
        rid = self._rid()
        pending = _Pending()
        self._requests[rid] = pending
        self._send({"t": "req", "id": rid, "op": op, **fields})
        pending.d.addTimeout(self._request_timeout, self._clock)
        try:
            return await pending.d
        except defer.TimeoutError:
            raise SessionError("timeout", f"timeout: the VM did not answer {op} within "
                               f"{self._request_timeout:g}s") from None
        finally:
            self._requests.pop(rid, None)

    async def info(self) -> dict[str, Any]:
        return await self.request("info")

    async def users(self) -> dict[str, Any]:
        return await self.request("users")

    async def authorize(self, key: bytes | str, name: str) -> dict[str, Any]:
        text = key if isinstance(key, str) else identity.public_text(key)
        return await self.request("authorize", key=text, name=name)

    async def revoke(self, who: bytes | str) -> dict[str, Any]:
        """Revoke by raw key, ``ed25519:..`` text, or user name."""
        if isinstance(who, bytes):
            return await self.request("revoke", key=identity.public_text(who))
        if who.startswith(identity.PREFIX):
            return await self.request("revoke", key=who)
        return await self.request("revoke", name=who)

    def exec(self, argv: list[str], stdin: bytes | None = None,
             on_stdout: Output | None = None, on_stderr: Output | None = None,
             on_warning: OnWarning | None = None) -> Command:
        """Start ``argv``; with ``stdin`` bytes, send them (as the window
        allows) and end of input."""
        self._check_open()
        rid = self._rid()
        cmd = Command(self, rid, "exec", on_stdout, on_stderr, on_warning)
        self._requests[rid] = cmd
        self._send({"t": "req", "id": rid, "op": "exec", "argv": list(argv)})
        cmd.started.callback(None)
        if stdin is not None:
            cmd.write(stdin)
            cmd.eof()
        return cmd

    def shell(self, term: str = "xterm-256color", rows: int = 24, cols: int = 80,
              on_output: Output | None = None, on_warning: OnWarning | None = None) -> Command:
        """Start a shell on a PTY; output (stdout and stderr merged) to ``on_output``."""
        self._check_open()
        rid = self._rid()
        cmd = Command(self, rid, "shell", on_output, on_output, on_warning)
        self._requests[rid] = cmd
        self._send({"t": "req", "id": rid, "op": "shell", "term": term, "rows": rows,
                    "cols": cols})
        return cmd

    def close(self) -> defer.Deferred[SessionError | None]:
        """Close the websocket (1000); fires when it is closed."""
        self._leg.close(closecodes.NORMAL.code, BYE)
        return _chain(self.closed)

    # -- from the leg (ticrypt.frontend.leg.AppReceiver) ---------------------

    def app_message(self, header: dict[str, Any], body: bytes) -> None:
        """One application message from the VM."""
        rid = header.get("id")
        target = self._requests.get(rid) if isinstance(rid, int) else None
        if target is not None:
            target._deliver(header, body)
        elif header.get("t") == "error":
            self.log.warn("VM reported {code}", code=str(header.get("code"))[:64])

    def leg_closed(self, err: SessionError | None) -> None:
        """The websocket is closed: every open request fails."""
        failure = err or SessionError("closed", "closed: the connection to the VM ended")
        for target in list(self._requests.values()):
            target._finish(None, failure)
        self._requests.clear()
        if not self.closed.called:
            self.closed.callback(err)


def _chain(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    out: defer.Deferred[Any] = defer.Deferred()

    def fire(result: Any) -> Any:
        out.callback(result)
        return result

    if d.called:
        out.callback(d.result)
    else:
        d.addBoth(fire)
    return out




async def open_session(reactor: Any, proxy_url: str, ca_file: str, ticket: str,
                       user_key: Ed25519PrivateKey, vm_id: str, vm_public_key: bytes | str,
                       *, timeout: float = 30.0, request_timeout: float = 60.0,
                       max_message: int = 1100000) -> ChannelSession:
    """Connect, present the ticket, pair, run the handshake; the ChannelSession.

    ``vm_public_key`` is the VM key rest reported (raw or ``ed25519:..``).
    ``timeout`` bounds the whole set-up, ``request_timeout`` each
    ``info``/``users``/``authorize``/``revoke`` (not exec or shell).
    """
    if isinstance(vm_public_key, str):
        vm_public_key = identity.parse_public(vm_public_key)

    def session(leg: UserLeg) -> ChannelSession:
        return ChannelSession(leg, reactor, request_timeout=request_timeout)

    return await open_leg(reactor, proxy_url, ca_file, ticket, user_key, vm_id, vm_public_key,
                          session, timeout=timeout, max_message=max_message)
