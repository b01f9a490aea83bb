"""Delayed calls that may already have run or been cancelled."""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall


def cancel_call(call: IDelayedCall | None) -> None:
    """Cancel ``call`` unless it is ``None``, has run or was cancelled
    (``IDelayedCall.cancel`` raises for the last two)."""
    if call is not None and call.active():
        call.cancel()


__all__ = ["cancel_call"]
