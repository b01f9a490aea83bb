"""The frontend's errors about a VM session, and how a close becomes one.

Every failure of a session is a :class:`SessionError`: ``code`` stable (the
close code's name of :mod:`ticrypt.closecodes`, the reason's name under 4400,
or a channel error code), ``str()`` one human line.  Text from the far end
goes through :func:`one_line` first, so a hostile proxy or VM cannot forge
extra lines or drive the user's terminal.
"""

from __future__ import annotations

from typing import Any

from ticrypt import closecodes
from ticrypt.channel import MESSAGES
from ticrypt.errors import CodedError


def one_line(text: object, limit: int = 300) -> str:
    """``text`` from the far end as one printable line of at most ``limit``
    characters: control characters (newlines, terminal escape sequences,
    bidi overrides) become ``?``, so a hostile proxy or VM cannot forge
    extra lines or drive the user's terminal through an error message."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])


class SessionError(CodedError):
    """The session failed or was refused: ``code`` stable, ``str()`` one human line."""


class RemoteError(SessionError):
    """The VM answered a request with ``{"t":"error"}``."""


def remote_error(header: dict[str, Any]) -> RemoteError:
    """The RemoteError for an ``error`` message from the VM."""
    return RemoteError(one_line(header.get("code", "error"), 64),
                       one_line(header.get("message", "")))


def explain_channel(code: str) -> str | None:
    """What a secure-channel failure means for the user: the reasons vmc
    sends under 4400 are channel error codes (PROTOCOL.md §4 Errors) or
    ``window-exceeded``."""
    return (closecodes.REASON_HUMAN.get(code) or MESSAGES.get(code)
            or closecodes.human(code))


def channel_error(code: str, message: str) -> SessionError:
    """This end's secure channel failed with ChannelError ``code``."""
    return SessionError(code, f"{code}: {closecodes.REASON_HUMAN.get(code) or message}")


def close_error(code: int | None, reason: str | None) -> SessionError:
    """The SessionError for a websocket close (code, reason from the far end).

    The failure is named after the close code (PROTOCOL.md §1.2), or after
    the reason's name for 4400 (a channel error code), for 1000 and for a
    code we do not know; the text explains it and adds what the far end said.
    """
    reason = one_line(reason or "", 200).strip()
    name, detail = closecodes.split_reason(reason)
    entry = closecodes.BY_CODE.get(code or 0)
    if code == closecodes.CHANNEL_ERROR.code:
        stable = name or closecodes.CHANNEL_ERROR.name
        explain = explain_channel(stable)
    elif entry is None or entry is closecodes.NORMAL:
        stable = name or (entry.name if entry else "closed")
        explain = closecodes.human(stable)
    else:
        stable, explain = entry.name, entry.human
    if not explain:
        return SessionError(stable, f"{stable}: connection closed ({code} {reason})")
    text = f"{stable}: {explain}"
    if name == stable and detail:
        text += f" ({detail})"
    elif reason and name != stable:
        text += f" ({reason})"
    return SessionError(stable, text)

