"""The page's REST calls, relayed to rest (PROTOCOL.md §7 "The page").

``METHOD /rest/v1/PATH`` -> rest's ``METHOD /v1/PATH`` through connect's
one CA-pinned JSON client (:class:`ticrypt.http.client.JsonClient`), so the
browser never talks to rest (nor needs to trust the deployment's CA).  Only
rest's user paths are relayed (:data:`RELAYED`); any other is 404
``not-relayed``.  The request body goes as it is (at most ``[connect]
max_body``); ``X-Ticrypt-Session: TOKEN`` becomes ``Authorization: Bearer
TOKEN`` upstream.  rest's status, JSON body and ``Retry-After`` come back
unchanged; rest unreachable, too slow or answering without JSON is 502
``rest-unavailable``.  Admission (Host, Origin, a page or API token) is
connect's own (:class:`ticrypt.connect.api.Admission`).
"""

from __future__ import annotations

import re

from twisted.web import server

from ticrypt.connect.api import PAGE_OFF, Admission
from ticrypt.http.client import HttpError, JsonClient
from ticrypt.http.server import ApiError, JsonResource, Result, Route

PREFIX = "/rest"

#: rest's operations the page may call (method, path template under /v1).
RELAYED = (
    ("GET", "/v1/backend"),
    ("POST", "/v1/auth/challenge"),
    ("POST", "/v1/auth/login"),
    ("POST", "/v1/auth/logout"),
    ("GET", "/v1/me"),
    ("GET", "/v1/users"),
    ("POST", "/v1/users"),
    ("POST", "/v1/users/{name}/disable"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{id}"),
    ("POST", "/v1/vms/{id}/ticket"),
    ("POST", "/v1/vms/{id}/pathways"),
    ("GET", "/v1/pathways"),
    ("DELETE", "/v1/pathways/{id}"),
    ("GET", "/v1/allowlist"),
    ("POST", "/v1/allowlist"),
    ("DELETE", "/v1/allowlist/{id}"),
)

ROUTES = tuple(Route(method, PREFIX + template, "relay") for method, template in RELAYED)

#: A path segment passed on: rest's ids and names (no dot segments, no escapes).
_SEGMENT = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,127}")
#: The session token header's value: what rest issues, bounded.
_SESSION = re.compile(r"[A-Za-z0-9._~+/=-]{1,1024}")


class RestRelay(JsonResource):
    """``/rest/v1/...`` -> rest.  ``rest_url`` None: the page is off (503
    ``page-disabled``)."""

    def __init__(self, *, admission: Admission, client: JsonClient | None,
                 rest_url: str | None):
        super().__init__(ROUTES)
        self.admission = admission
        self._client = client
        self._rest_url = rest_url

    def admit(self, request: server.Request) -> None:
        self.admission.check(request)
        if self._client is None or self._rest_url is None:
            raise ApiError(503, "page-disabled", PAGE_OFF)
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("ascii", "replace")
        for route in self.routes:
            m = route.regex.fullmatch(path)
            if m is not None and route.method == method \
                    and all(_SEGMENT.fullmatch(p) for p in m.groups()):
                return
        raise ApiError(404, "not-relayed", f"{method} {path[:100]} is not relayed to rest")

    async def handle(self, request: server.Request, route: Route,
                     params: tuple[str, ...]) -> Result:
        assert self._client is not None and self._rest_url is not None
        assert request.content is not None
        body = request.content.read()
        headers = {}
        session = request.getHeader(b"x-ticrypt-session")
        if session is not None:
            text = session.decode("latin-1")
            if not _SESSION.fullmatch(text):
                raise ApiError(400, "invalid-header", "X-Ticrypt-Session is not a "
                               "session token")
            headers["Authorization"] = "Bearer " + text
        method = request.method.decode("ascii")
        upstream = self._rest_url + request.path.decode("ascii")[len(PREFIX):]
        try:
            answer = await self._client.exchange(method, upstream, body or None, headers)
        except HttpError as e:
            raise ApiError(502, "rest-unavailable", f"rest did not answer: {e}") from None
        retry = answer.header("Retry-After")
        if retry is not None and re.fullmatch(r"[0-9]{1,9}", retry):
            request.setHeader(b"Retry-After", retry.encode("ascii"))
        if answer.status == 204:
            return 204, None
        return answer.status, answer.raw


__all__ = ["RELAYED", "ROUTES", "RestRelay"]
