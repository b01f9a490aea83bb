"""rest on :mod:`ticrypt.http.server`: :data:`ticrypt.rest.api.ROUTES` served
by :class:`~ticrypt.rest.api.RestApi` in a bounded JSON site.  The bounds
(body size, request timeout, connection limits) and the JSON errors are the
generic layer's."""

from __future__ import annotations

from typing import Any

from twisted.web import server

from ticrypt.http.server import JsonResource, JsonSite, Result, Route, bearer_token
from ticrypt.rest.api import ROUTES, Call, RestApi

#: Successful requests of this path are logged at debug level: the proxy
#: fetches the revocation feed every couple of seconds, and its successful
#: polls would drown every other line.
QUIET_PATH = "/v1/revocations"


class RestResource(JsonResource):
    """Each request as a :class:`~ticrypt.rest.api.Call` to the RestApi
    method its route names."""

    def __init__(self, api: RestApi):
        super().__init__(ROUTES)
        self._api = api

    async def handle(self, request: server.Request, route: Route,
                     params: tuple[str, ...]) -> Result:
        assert request.content is not None
        call = Call(method=route.method, params=params, body=request.content.read(),
                    client=request.getClientAddress().host, bearer=bearer_token(request))
        result: Result = await getattr(self._api, route.handler)(call)
        return result


def rest_site(api: RestApi, *, reactor: Any, max_body: int, idle_timeout: float,
              request_timeout: float) -> JsonSite:
    """rest's site; wrap it in a :class:`~ticrypt.http.server.LimitedFactory`
    to listen."""
    return JsonSite(RestResource(api), reactor=reactor, max_body=max_body,
                    idle_timeout=idle_timeout, request_timeout=request_timeout,
                    access_namespace="ticrypt.rest.access", quiet_paths=(QUIET_PATH,))


__all__ = ["QUIET_PATH", "RestResource", "rest_site"]
