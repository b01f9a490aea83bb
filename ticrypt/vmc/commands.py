"""Sans-IO command dispatcher: decoded application messages in, actions out.

One :class:`Dispatcher` per secure channel.  It validates every request,
enforces "owner only" for user management, answers ``info``/``users``/
``authorize``/``revoke`` itself (through the injected :class:`UserStore`)
and turns ``exec``/``shell``/``stdin``/``eof``/``cancel``/``resize`` into
actions that the process layer carries out.  It never touches a process, a
transport or the reactor.

It also keeps each running request's stdin flow-control window (PROTOCOL.md
§5): ``stdin`` bytes use up credit, :meth:`Dispatcher.consumed` (the process
layer passed bytes on to the child) gives it back as a ``window`` message, and
input beyond the window is a :class:`Violation` that ends the channel.  So
vmc holds at most ``window`` bytes of input per request and never has to stop
reading the channel because a child is slow to read its stdin.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol, TypeAlias

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ticrypt import identity
from ticrypt.channel.app import MAX_ARGS, MAX_ARGV_CHARS, WINDOW, AppError
from ticrypt.vmc.pins import PinRefused

#: Longest ``cert`` (PEM text) a ``tunnel-accept`` may carry.
MAX_CERT_PEM = 8192

_TERM_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+")


class UserStore(Protocol):
    """What the dispatcher needs of :class:`ticrypt.vmc.state.VmState`."""

    owner_key: bytes | None

    def is_owner(self, key: bytes) -> bool: ...

    def users(self) -> list[Any]: ...

    def authorize(self, key: bytes, name: str, by: bytes) -> bool: ...

    def revoke(self, who: str | bytes, by: bytes) -> Any: ...


class TunnelGate(Protocol):
    """What the dispatcher needs of the tunnel server
    (:class:`ticrypt.vmc.tunnel.TunnelServer`)."""

    def accept(self, fingerprint: str, user: str, user_key: bytes) -> dict[str, Any]:
        """Pin ``fingerprint`` for the user; the ``ok`` fields (``ports``,
        ``tls_fingerprint``, ``pin_expires``...).  Raises PinRefused."""
        ...

    def revoked(self, user_key: bytes) -> None:
        """The user lost access: drop their pins, close their tunnels."""
        ...


def cert_fingerprint(pem: object) -> str:
    """``sha256:<hex>`` of the DER of one PEM certificate; AppError
    ``bad-certificate`` for anything else (the text is never echoed)."""
    if not isinstance(pem, str) or not pem or len(pem) > MAX_CERT_PEM:
        raise AppError("bad-certificate", f"cert must be one PEM certificate of at most "
                       f"{MAX_CERT_PEM} characters")
    if pem.count("-----BEGIN ") != 1 or "-----BEGIN CERTIFICATE-----" not in pem:
        raise AppError("bad-certificate", "cert must hold exactly one PEM certificate "
                       "(and no key)")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        der = cert.public_bytes(Encoding.DER)
    except (ValueError, UnicodeEncodeError):
        raise AppError("bad-certificate", "cert is not a readable X.509 certificate") from None
    return "sha256:" + hashlib.sha256(der).hexdigest()


@attrs.frozen
class Send:
    """Seal and send this application message to the frontend."""

    header: dict[str, Any]
    body: bytes = attrs.field(default=b"", repr=False)


@attrs.frozen
class StartExec:
    """Start ``argv``; once started, announce ``window`` in the ``ok``."""

    rid: int
    argv: tuple[str, ...]
    window: int = WINDOW


@attrs.frozen
class StartShell:
    """Start a shell on a PTY; once started, announce ``window`` in the ``ok``."""

    rid: int
    term: str
    rows: int
    cols: int
    window: int = WINDOW


@attrs.frozen
class Stdin:
    rid: int
    data: bytes = attrs.field(repr=False)


@attrs.frozen
class Eof:
    rid: int


@attrs.frozen
class Cancel:
    rid: int


@attrs.frozen
class Resize:
    rid: int
    rows: int
    cols: int


@attrs.frozen
class Revoked:
    """A user lost access: close their open channels."""

    key: bytes


@attrs.frozen
class Violation:
    """The frontend broke the protocol in a way that ends the channel
    (``code`` stable, e.g. ``window-exceeded``; ``message`` human)."""

    code: str
    message: str


Action: TypeAlias = (Send | StartExec | StartShell | Stdin | Eof | Cancel | Resize | Revoked
                     | Violation)


def error(rid: int | None, code: str, message: str) -> Send:
    header: dict[str, Any] = {"t": "error", "code": code, "message": message}
    if rid is not None:
        header["id"] = rid
    return Send(header)


def _exec_arg(a: object) -> bool:
    """A string ``execve`` can take: no NUL, encodable as a file-system string
    (JSON may carry lone surrogates, which no encoding accepts)."""
    if not isinstance(a, str) or "\x00" in a:
        return False
    try:
        a.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _window(header: dict[str, Any]) -> tuple[int, int]:
    rows, cols = header.get("rows", 24), header.get("cols", 80)
    for v in (rows, cols):
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 10000:
            raise AppError("bad-request", "rows and cols must be integers in 1..10000")
    return rows, cols


@attrs.define
class Dispatcher:
    """Maps one channel's requests to actions.

    ``user_key`` is the authenticated peer (``user`` its name, for the
    audit); ``info`` the static part of the ``info`` answer;
    ``max_processes`` bounds concurrent exec/shell requests; ``window`` is the
    stdin window each exec/shell request gets; ``tunnel`` pins certificates
    for ``tunnel-accept`` (None: the tunnel is disabled).
    """

    store: UserStore
    user_key: bytes
    info: dict[str, Any]
    max_processes: int = 16
    window: int = WINDOW
    tunnel: TunnelGate | None = None
    user: str = ""
    _running: dict[int, str] = attrs.field(factory=dict)
    _used: set[int] = attrs.field(factory=set)
    #: Per running request: stdin bytes the frontend may still send.
    _credit: dict[int, int] = attrs.field(factory=dict)
    #: exec requests whose stdin the frontend ended (``eof``).
    _eof: set[int] = attrs.field(factory=set)
    #: Per running request: stdin bytes passed on whose credit is not sent yet.
    _owed: dict[int, int] = attrs.field(factory=dict)

    def finished(self, rid: int) -> None:
        """The process of ``rid`` is gone (its ``exit`` has been sent)."""
        self._running.pop(rid, None)
        self._credit.pop(rid, None)
        self._owed.pop(rid, None)
        self._eof.discard(rid)

    @property
    def credit_step(self) -> int:
        """The least credit sent in one ``window`` message: a quarter of the
        window (so the frontend always has at least three quarters of it to
        send while vmc's buffer is empty, and a stream costs a credit message
        per quarter window instead of one per write to the child)."""
        return max(1, self.window // 4)

    def consumed(self, rid: int, n: int) -> list[Action]:
        """The process layer passed ``n`` stdin bytes of ``rid`` on (written to
        the child, or dropped because its stdin is closed): give the credit
        back to the frontend once at least :attr:`credit_step` is owed."""
        if rid not in self._credit or n <= 0:
            return []
        owed = self._owed.get(rid, 0) + n
        if owed < self.credit_step:
            self._owed[rid] = owed
            return []
        self._owed.pop(rid, None)
        self._credit[rid] = min(self.window, self._credit[rid] + owed)
        return [Send({"t": "window", "id": rid, "bytes": owed})]

    def credit(self, rid: int) -> int | None:
        """Stdin bytes the frontend may still send for ``rid`` (None: not running)."""
        return self._credit.get(rid)

    def _take(self, rid: int, n: int) -> Violation | None:
        left = self._credit.get(rid, 0)
        if n > left:
            return Violation("window-exceeded", f"request {rid} sent {n} stdin bytes "
                             f"with a window of {left}")
        self._credit[rid] = left - n
        return None

    @property
    def running(self) -> dict[int, str]:
        return dict(self._running)

    def handle(self, header: dict[str, Any], body: bytes) -> list[Action]:
        """Actions for one decoded message; errors become ``error`` replies."""
        rid = header.get("id")
        try:
            if not isinstance(rid, int):
                raise AppError("bad-message", "message has no request id")
            kind = header["t"]
            if kind == "req":
                return self._request(rid, header)
            if kind in ("stdin", "eof", "cancel", "resize"):
                return self._stream(kind, rid, header, body)
            raise AppError("bad-message", f"unknown message type {kind!r}"[:120])
        except AppError as e:
            return [error(rid if isinstance(rid, int) else None, e.code, e.message)]

    def _request(self, rid: int, header: dict[str, Any]) -> list[Action]:
        if rid in self._used:
            raise AppError("duplicate-id", "request id already used on this channel")
        self._used.add(rid)
        op = header.get("op")
        if op == "info":
            return [Send({"t": "ok", "id": rid, **self.info,
                          "owner_user": self.store.is_owner(self.user_key)})]
        if op in ("exec", "shell"):
            if len(self._running) >= self.max_processes:
                raise AppError("over-limit", f"at most {self.max_processes} running "
                               "commands per connection")
            if op == "exec":
                argv = header.get("argv")
                if (not isinstance(argv, list) or not argv or len(argv) > MAX_ARGS
                        or not all(_exec_arg(a) for a in argv)
                        or not argv[0] or sum(map(len, argv)) > MAX_ARGV_CHARS):
                    raise AppError("bad-request", "argv must be a non-empty list of strings")
                self._running[rid] = "exec"
                self._credit[rid] = self.window
                return [StartExec(rid, tuple(argv), self.window)]
            term = header.get("term", "xterm-256color")
            if not isinstance(term, str) or not term or len(term) > 64 or not set(term) <= _TERM_OK:
                raise AppError("bad-request", "term must be a terminal type name")
            rows, cols = _window(header)
            self._running[rid] = "shell"
            self._credit[rid] = self.window
            return [StartShell(rid, term, rows, cols, self.window)]
        if op == "tunnel-accept":
            if self.tunnel is None:
                raise AppError("tunnel-disabled", "the tunnel server is not enabled on this VM")
            fingerprint = cert_fingerprint(header.get("cert"))
            try:
                granted = self.tunnel.accept(fingerprint, self.user, self.user_key)
            except PinRefused as e:
                raise AppError(e.code, e.message) from None
            return [Send({"t": "ok", "id": rid, **granted})]
        if op in ("authorize", "revoke", "users"):
            if not self.store.is_owner(self.user_key):
                raise AppError("not-owner", "only the VM owner may manage its users")
            try:
                return self._manage(rid, op, header)
            except OSError:
                # e.g. a full disk: the old users.json (and memory) are unchanged
                raise AppError("storage-error", "could not save the user list on the "
                               "VM; nothing was changed") from None
        raise AppError("unknown-op", "unknown operation")

    def _manage(self, rid: int, op: str, header: dict[str, Any]) -> list[Action]:
        if op == "users":
            owner = self.store.owner_key
            assert owner is not None  # is_owner() held
            return [Send({"t": "ok", "id": rid,
                          "owner": {"name": self.info.get("owner"),
                                    "key": identity.public_text(owner)},
                          "users": [{"name": u.name, "key": identity.public_text(u.key)}
                                    for u in self.store.users()]})]
        key_text, name = header.get("key"), header.get("name")
        key: bytes | None = None
        if key_text is not None:
            try:
                key = identity.parse_public(key_text) if isinstance(key_text, str) else None
            except ValueError:
                key = None
            if key is None:
                raise AppError("bad-request", "key must be 'ed25519:<base64url>'")
        if op == "authorize":
            if key is None or not isinstance(name, str):
                raise AppError("bad-request", "authorize needs key and name")
            try:
                added = self.store.authorize(key, name, by=self.user_key)
            except ValueError as e:
                raise AppError("bad-request", str(e)) from None
            return [Send({"t": "ok", "id": rid, "name": name,
                          "key": identity.public_text(key), "added": added})]
        who: str | bytes | None = key if key is not None else name
        if not isinstance(who, (str, bytes)) or not who:
            raise AppError("bad-request", "revoke needs key or name")
        gone = self.store.revoke(who, by=self.user_key)
        if gone is None:
            raise AppError("no-such-user", "no such authorized user on this VM")
        return [Send({"t": "ok", "id": rid, "name": gone.name,
                      "key": identity.public_text(gone.key)}), Revoked(gone.key)]

    def _stream(self, kind: str, rid: int, header: dict[str, Any], body: bytes) -> list[Action]:
        if rid not in self._running:
            if rid in self._used:
                return []  # the process already ended; late input is harmless
            raise AppError("no-such-request", "no running command with this id")
        if kind == "stdin":
            if not body or rid in self._eof:
                return []  # after eof (exec): dropped, and not counted
            violation = self._take(rid, len(body))
            return [violation or Stdin(rid, body)]
        if kind == "eof":
            if self._running[rid] == "shell":
                # A shell's eof is the ^D byte in its input: it takes one byte
                # of the window like any other input (else repeated eofs
                # could pile up in vmc unbounded).
                return [self._take(rid, 1) or Eof(rid)]
            self._eof.add(rid)
            return [Eof(rid)]
        if kind == "cancel":
            return [Cancel(rid)]
        if self._running[rid] != "shell":
            raise AppError("bad-request", "resize applies to a shell only")
        rows, cols = _window(header)
        return [Resize(rid, rows, cols)]
