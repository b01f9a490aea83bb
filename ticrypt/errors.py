"""The one base of the errors that carry a stable code."""

from __future__ import annotations


class CodedError(Exception):
    """A refusal or failure: ``code`` is stable (tests, logs and wire answers
    use it), ``message`` and ``str()`` are one human line."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)
