"""The audit log: one JSON object per line, for security events.

Each line says who, what, from where and the result.  It never holds payload
bytes, keys, tokens or signatures: :meth:`AuditLog.write` refuses such
field names so that a mistake shows up in tests rather than in a log file.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any, Protocol

from twisted.logger import Logger

FORBIDDEN_FIELDS = frozenset(
    {"token", "ticket", "secret", "password", "passphrase", "private_key", "payload",
     "signature", "data", "session_token", "enrollment_token"}
)


class _Clock(Protocol):
    def seconds(self) -> float: ...


class AuditLog:
    """Append-only JSON-lines audit log.  Each line is flushed as written so a
    crash of the daemon loses nothing already logged.

    ``clock`` (the role's reactor, or a ``task.Clock`` in tests) stamps each
    line's ``ts``: it is required, so no line is stamped by a clock the
    caller did not choose."""

    log = Logger()

    def __init__(self, path: str | None, clock: _Clock, role: str = ""):
        self._clock = clock
        self._role = role
        self._file: IO[str] | None = None
        self.path = path
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        bad = FORBIDDEN_FIELDS.intersection(fields)
        if bad:
            raise ValueError(f"audit fields may not carry secrets: {sorted(bad)}")
        record: dict[str, Any] = {"ts": round(self._clock.seconds(), 3), "event": event}
        if self._role:
            record["role"] = self._role
        record.update(fields)
        line = json.dumps(record, sort_keys=True, default=str)
        self.log.info("audit {event} {fields}", event=event, fields=fields)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
