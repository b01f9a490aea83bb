"""``POST /v1/enroll``: the one HTTPS call vmc makes to rest.

The client (:class:`ticrypt.http.client.JsonClient`) trusts only
``ca_file``, has one deadline for the whole exchange and reads at most
:data:`MAX_BODY` bytes of answer.
"""

from __future__ import annotations

from typing import Any

from ticrypt.http.client import HttpError, JsonClient

MAX_BODY = 65536


class EnrollError(Exception):
    """Enrollment failed.  ``code`` is rest's error code (or a local one such as
    ``unreachable``); ``permanent`` is True when retrying cannot help."""

    def __init__(self, code: str, message: str, permanent: bool):
        self.code = code
        self.permanent = permanent
        super().__init__(message)


async def post_json(reactor: Any, url: str, ca_file: str, body: dict[str, Any],
                    timeout: float) -> tuple[int, Any]:
    """POST ``body`` as JSON; (status, parsed JSON answer) within ``timeout``."""
    client = JsonClient(reactor, ca_file, timeout=timeout, max_response=MAX_BODY)
    try:
        return await client.request("POST", url, body)
    except HttpError as e:
        raise EnrollError(e.code, f"cannot reach rest: {e}", permanent=False) from None


async def enroll(reactor: Any, rest_url: str, ca_file: str, *, token: str,
                 vm_public_key: str, tls_fingerprint: str, timeout: float) -> dict[str, Any]:
    """The enrollment answer (a JSON object), or :class:`EnrollError`."""
    status, answer = await post_json(
        reactor, rest_url + "/v1/enroll", ca_file,
        {"token": token, "vm_public_key": vm_public_key, "tls_fingerprint": tls_fingerprint},
        timeout)
    if status == 200 and isinstance(answer, dict):
        return answer
    err = answer.get("error") if isinstance(answer, dict) else None
    code = str(err.get("code", "error")) if isinstance(err, dict) else "error"
    message = str(err.get("message", "")) if isinstance(err, dict) else ""
    raise EnrollError(code[:64], f"rest refused enrollment (HTTP {status} {code}): "
                      f"{message[:200]}", permanent=400 <= status < 500)
