"""The websocket close codes of every role: number, stable name, human line.

One table (PROTOCOL.md §1.2) for the proxy, vmc and the frontend, the way
txtorcon keeps one table of SOCKS codes: senders take the number and the
name from here, receivers turn a close back into a name and an explanation
for the user.  Reasons on the wire are ``name: text`` or a bare ``name``
(:func:`reason` builds one, :func:`split_reason` reads one).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class CloseCode:
    """One close code: ``code`` on the wire, ``name`` for programs (the
    reason's name part), ``human`` for the person reading the error."""

    code: int
    name: str
    human: str


NORMAL = CloseCode(1000, "normal", "the session ended")
GOING_AWAY = CloseCode(1001, "going-away", "the far end is going away")
TOO_BIG = CloseCode(1009, "message-too-big", "a message was over the proxy's size limit")
SERVER_ERROR = CloseCode(1011, "server-error", "the proxy failed unexpectedly")
BAD_MESSAGE = CloseCode(4000, "bad-message", "a malformed control message")
VM_AUTH_FAILED = CloseCode(4001, "vm-auth-failed", "the VM could not prove its identity")
TICKET_REFUSED = CloseCode(4003, "ticket-refused", "the proxy refused the connection ticket")
NO_VM = CloseCode(4004, "no-vm-available",
                  "the VM is not connected to the proxy (is it running?)")
TIMEOUT = CloseCode(4008, "timeout", "timed out")
OVER_LIMIT = CloseCode(4009, "over-limit", "too many connections")
PEER_LOST = CloseCode(4010, "peer-lost", "the other end vanished without closing")
REVOKED = CloseCode(4011, "revoked", "access was revoked at the backend (user disabled or "
                    "session ended); sign in again if you still may")
CHANNEL_ERROR = CloseCode(4400, "channel-error", "the secure channel failed")
PROXY_UNREACHABLE = CloseCode(4013, "proxy-unreachable",
                              "ticrypt-connect could not reach the proxy (is the backend "
                              "up? is connect's [page] configured?)")
NOT_AUTHORIZED = CloseCode(4401, "not-authorized",
                           "you are not authorized on this VM; ask its owner to run "
                           "'ticrypt authorize VM YOU'")

ALL: tuple[CloseCode, ...] = (NORMAL, GOING_AWAY, TOO_BIG, SERVER_ERROR, BAD_MESSAGE,
                              VM_AUTH_FAILED, TICKET_REFUSED, NO_VM, TIMEOUT, OVER_LIMIT,
                              PEER_LOST, REVOKED, PROXY_UNREACHABLE, CHANNEL_ERROR,
                              NOT_AUTHORIZED)
BY_CODE: dict[int, CloseCode] = {c.code: c for c in ALL}

#: Explanations of reason names carried under 4400 (and a few end-to-end
#: names) that are not close codes of their own.
REASON_HUMAN: dict[str, str] = {
    "vm-key-mismatch": "the VM presented a key other than the one registered in rest; "
                       "refusing to talk to it",
    "window-exceeded": "this client sent the VM more input than it allowed (a client bug)",
    "record-too-large": "a record was over the size limit of the far end",
}

#: Longest close reason in UTF-8 bytes (RFC 6455 §5.5.1: 125-byte payload).
MAX_REASON = 123


def reason(name: str, text: str = "") -> str:
    """``name: text`` (or the bare name), cut to :data:`MAX_REASON` bytes of
    UTF-8 without splitting a character."""
    full = f"{name}: {text}" if text else name
    raw = full.encode("utf-8")[:MAX_REASON]
    return raw.decode("utf-8", "ignore")


def split_reason(text: str | None) -> tuple[str, str]:
    """``(name, text)`` of a received reason: the name ends at the first
    ``:`` or space (PROTOCOL.md §1.2); either part may be empty."""
    text = (text or "").strip()
    cut = min((i for i in (text.find(":"), text.find(" ")) if i >= 0), default=len(text))
    return text[:cut], text[cut + 1:].strip()


def passed_on(code: int | None, text: str | None) -> tuple[int, str]:
    """What a relay closes the other side with when one side's peer sent a
    close frame with ``code`` and reason ``text`` (PROTOCOL.md §3 Closing): 1000,
    1001 and 4000..4999 unchanged, no code as 1000, anything else 4010."""
    if code is None:
        return NORMAL.code, ""
    if code in (NORMAL.code, GOING_AWAY.code) or 4000 <= code <= 4999:
        return code, text or ""
    return PEER_LOST.code, reason(PEER_LOST.name, f"the peer closed with code {code}")


def human(name: str) -> str | None:
    """The explanation of a close code's or reason's name, if we have one."""
    for c in ALL:
        if c.name == name:
            return c.human
    return REASON_HUMAN.get(name)
