"""connect's local JSON API (on :mod:`ticrypt.http.server`), for the
``ticrypt`` CLI now and a browser frontend served by connect later.

It listens on 127.0.0.1 only, and every request must pass three checks
(:meth:`ConnectResource.admit`), in this order:

* ``Host`` is exactly ``127.0.0.1:PORT`` of the API's own listener, so a web
  page cannot reach it through a rebound DNS name (403 ``bad-host``);
* ``Origin``, when the client sends one (browsers do on every cross-site
  request), is connect's own ``http://127.0.0.1:PORT`` (403 ``bad-origin``);
* ``Authorization: Bearer TOKEN`` carries the token connect wrote at start,
  0600, to ``token_file`` (401 ``unauthorized``).

Operations::

    POST   /v1/certs          -> 201 {"id", "cert", "fingerprint", "expires"}
    POST   /v1/tunnels        {"vm", "name"?, "proxy_host", "proxy_port", "cert",
                               "fingerprint", "forwards": [{"remote", "local"}],
                               "pathway"?, "wait"?}
                              -> 201 {"tunnel": TUNNEL}
    GET    /v1/tunnels        -> 200 {"tunnels": [TUNNEL, ...]}
    DELETE /v1/tunnels/{id}   -> 200 {"tunnel": TUNNEL}

``TUNNEL`` is :meth:`~ticrypt.connect.tunnels.Tunnel.describe`: id, vm,
name, state, proxy, pathway (rest's, as given), forwards ``[{"remote", "local"}]``, streams (open local
connections), connections, bytes_in (from the VM), bytes_out (to it),
connects, last_error.  With ``"wait": true`` the answer comes once the link
is up, or is 502 ``tunnel-failed`` (the tunnel is then closed) if the first
attempt fails.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from twisted.web import server
from twisted.web.resource import IResource

from ticrypt.audit import AuditLog
from ticrypt.connect.certs import FINGERPRINT_RE, CertError, CertStore
from ticrypt.connect.page import PageTokens
from ticrypt.connect.tunnels import Forward, Tunnel, TunnelError, TunnelSpec, TunnelTable
from ticrypt.http.server import (
    ApiError,
    Field,
    JsonResource,
    JsonSite,
    Result,
    bearer_token,
    enabled,
    parse_body,
    route,
    routes_of,
)

#: Why the page's paths answer 503 ``page-disabled``.
PAGE_OFF = "the page is off: set [page] rest_url in connect.ini"

PAGE_SESSION = b"/v1/page/session"
PAGE_LINK = b"/v1/page/link"

#: Makes (does not start) a tunnel: id, spec -> Tunnel.
MakeTunnel = Callable[[str, TunnelSpec], Tunnel]


def _check_fingerprint(value: str) -> str | None:
    return None if FINGERPRINT_RE.fullmatch(value) else "must be 'sha256:<64 lowercase hex>'"


def _check_text(limit: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if not value or len(value) > limit or not value.isprintable() or " " in value:
            return f"must be 1 to {limit} printable characters without spaces"
        return None
    return check


def _check_port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port 1..65535"


TUNNEL_FIELDS = {
    "vm": Field(str, check=_check_text(128)),
    "name": Field(str, required=False, check=_check_text(128)),
    "proxy_host": Field(str, check=_check_text(253)),
    "proxy_port": Field(int, check=_check_port),
    "cert": Field(str, check=_check_text(64)),
    "fingerprint": Field(str, check=_check_fingerprint),
    "forwards": Field(list),
    "pathway": Field(str, required=False, check=_check_text(128)),
    "wait": Field(bool, required=False),
}


def parse_forwards(raw: list[Any], limit: int) -> tuple[Forward, ...]:
    """``[{"remote": P, "local": L}]`` as Forwards; ApiError 400."""
    if not raw or len(raw) > limit:
        raise ApiError(400, "invalid-field", f"field 'forwards' must list 1 to {limit} ports")
    out: list[Forward] = []
    for item in raw:
        if not isinstance(item, dict) or set(item) - {"remote", "local"} \
                or not isinstance(item.get("remote"), int) \
                or not isinstance(item.get("local", 0), int) \
                or isinstance(item.get("remote"), bool) or isinstance(item.get("local"), bool):
            raise ApiError(400, "invalid-field", "each forward must be "
                           '{"remote": PORT, "local": PORT or 0}')
        remote, local = item["remote"], item.get("local", 0)
        if not 1 <= remote <= 65535 or not 0 <= local <= 65535:
            raise ApiError(400, "invalid-field", "forward ports must be 1..65535 "
                           "(local 0: any free port)")
        out.append(Forward(remote, local))
    remotes = [f.remote for f in out]
    locals_ = [f.local for f in out if f.local]
    if len(set(remotes)) != len(remotes) or len(set(locals_)) != len(locals_):
        raise ApiError(400, "invalid-field", "a port is listed twice in 'forwards'")
    return tuple(out)


class Admission:
    """Who may use connect's site (PROTOCOL.md §7 Admission): the Host of
    the listener, no other web page's Origin, and a token: the one in
    ``token_file`` (the CLI) or a page token (the page).  Refusals are
    audited (``api-refused``), never with a token."""

    def __init__(self, *, token: Callable[[], str | None],
                 address: Callable[[], tuple[str, int] | None], audit: AuditLog,
                 page: PageTokens | None = None):
        self._token = token
        self._address = address
        self._audit = audit
        self.page = page

    def own(self) -> str:
        """``127.0.0.1:PORT`` of the listener; ApiError 503 before it listens."""
        where = self._address()
        if where is None:
            raise ApiError(503, "not-ready", "connect is starting")
        return f"{where[0]}:{where[1]}"

    def site_problem(self, host: str | None, origin: str | None,
                     origin_required: bool = False) -> str | None:
        """``bad-host``, ``bad-origin`` or ``not-ready`` for these headers, or None."""
        where = self._address()
        if where is None:
            return "not-ready"
        own = f"{where[0]}:{where[1]}"
        if host != own:
            return "bad-host"
        if (origin is None and origin_required) or (origin is not None
                                                    and origin != f"http://{own}"):
            return "bad-origin"
        return None

    def token_problem(self, given: str | None, page_ok: bool = True) -> str | None:
        """``unauthorized`` unless ``given`` is the token_file token (or,
        with ``page_ok``, a valid page token)."""
        expected = self._token()
        if given is None:
            return "unauthorized"
        if expected is not None and hmac.compare_digest(given.encode("utf-8", "replace"),
                                                        expected.encode()):
            return None
        if page_ok and self.page is not None and self.page.valid(given):
            return None
        return "unauthorized"

    def check_site(self, request: server.Request, origin_required: bool = False) -> None:
        """Host and Origin of ``request``; ApiError 403 (503 before listening)."""
        problem = self.site_problem(header_text(request, b"host"), header_text(request, b"origin"),
                                    origin_required)
        if problem == "not-ready":
            self.own()
        if problem is not None:
            self.refused(request, problem)
            if problem == "bad-host":
                raise ApiError(403, "bad-host", f"this API answers only requests for "
                               f"{self.own()}")
            raise ApiError(403, "bad-origin", "requests from other web pages are refused")

    def check(self, request: server.Request, page_ok: bool = True) -> None:
        """Host, Origin and the bearer token; ApiError 403 / 401."""
        self.check_site(request)
        if self.token_problem(bearer_token(request), page_ok) is not None:
            self.refused(request, "unauthorized")
            raise ApiError(401, "unauthorized", "missing or wrong API token (it is in "
                           "connect's token_file)", {"WWW-Authenticate": "Bearer"})

    def refused(self, request: server.Request, why: str) -> None:
        self.audit_refusal(why, request.getClientAddress().host,
                           request.method.decode("ascii", "replace"),
                           request.path.decode("ascii", "replace"))

    def audit_refusal(self, why: str, client: str, method: str, path: str) -> None:
        self._audit.write("api-refused", reason=why, client=client, method=method,
                          path=path[:100])


def header_text(request: server.Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


class ConnectResource(JsonResource):
    """The API.  ``address()`` is the listener's ``(host, port)`` once it
    listens (None before: everything is refused)."""

    def __init__(self, *, token: Callable[[], str | None],
                 address: Callable[[], tuple[str, int] | None], certs: CertStore,
                 table: TunnelTable, make_tunnel: MakeTunnel, audit: AuditLog,
                 page: PageTokens | None = None):
        super().__init__(ROUTES)
        self.admission = Admission(token=token, address=address, audit=audit, page=page)
        self.page = page
        self.certs = certs
        self.table = table
        self._make_tunnel = make_tunnel
        self._audit = audit

    # -- who may ask -----------------------------------------------------------

    def admit(self, request: server.Request) -> None:
        path = request.path
        if path == PAGE_SESSION:  # the page signs in with a link: no token yet
            self.admission.check_site(request, origin_required=True)
        elif path == PAGE_LINK:   # the CLI asks for a link: token_file token only
            self.admission.check(request, page_ok=False)
        else:
            self.admission.check(request)

    # -- operations --------------------------------------------------------------

    def _page(self) -> PageTokens:
        return enabled(self.page, "page-disabled", PAGE_OFF)

    @route("POST", "/v1/page/session")
    async def page_session(self, body: bytes) -> Result:
        page = self._page()
        b = parse_body(body, {"link": Field(str, check=_check_text(128))})
        redeemed = page.redeem(b["link"])
        if redeemed is None:
            self._audit.write("page-refused", reason="bad-link")
            raise ApiError(401, "bad-link", "this sign-in link is unknown, used or expired; "
                           "run 'ticrypt open' for a new one")
        token, expires = redeemed
        self._audit.write("page-session", expires=int(expires))
        return 201, {"token": token, "expires": int(expires)}

    @route("POST", "/v1/page/link")
    async def page_link(self, body: bytes) -> Result:
        parse_body(body, {})
        url, expires = self.new_page_url()
        return 201, {"url": url, "expires": int(expires)}

    def new_page_url(self) -> tuple[str, float]:
        """The page's URL with a fresh one-time link, and when the link expires."""
        link, expires = self._page().new_link()
        return f"http://{self.admission.own()}/#link={link}", expires

    @route("POST", "/v1/certs")
    async def create_cert(self, body: bytes) -> Result:
        parse_body(body, {})
        try:
            cert = self.certs.create(self.table.certs_in_use())
        except CertError as e:
            raise ApiError(409, "too-many-certs", str(e)) from None
        self._audit.write("cert-created", cert=cert.id, fingerprint=cert.fingerprint)
        return 201, cert.public()

    @route("GET", "/v1/tunnels")
    async def list_tunnels(self, body: bytes) -> Result:
        return 200, {"tunnels": [t.describe() for t in self.table.tunnels.values()]}

    @route("POST", "/v1/tunnels")
    async def open_tunnel(self, body: bytes) -> Result:
        b = parse_body(body, TUNNEL_FIELDS)
        forwards = parse_forwards(b["forwards"], self.table.settings.max_forwards)
        try:
            self.certs.get(b["cert"])
            self.table.check_room()
        except CertError as e:
            raise ApiError(404, "no-such-cert", str(e)) from None
        except TunnelError as e:
            raise ApiError(409, e.code, str(e)) from None
        spec = TunnelSpec(vm=b["vm"], proxy_host=b["proxy_host"], proxy_port=b["proxy_port"],
                          cert_id=b["cert"], fingerprint=b["fingerprint"], forwards=forwards,
                          pathway=b.get("pathway"))
        tid = self.table.new_id()
        try:
            tunnel = self._make_tunnel(tid, spec)
        except (CertError, ValueError) as e:
            raise ApiError(400, "invalid-tunnel", str(e)) from None
        tunnel.name = b.get("name") or b["vm"]
        self.table.tunnels[tid] = tunnel
        try:
            ports = await tunnel.start()
        except TunnelError as e:
            self.table.tunnels.pop(tid, None)
            self._audit.write("tunnel-refused", vm=spec.vm, reason=str(e))
            raise ApiError(409, e.code, str(e)) from None
        self._audit.write("tunnel-opened", tunnel=tid, vm=spec.vm, cert=spec.cert_id,
                          proxy=f"{spec.proxy_host}:{spec.proxy_port}",
                          ports=[f"{loc}->{r}" for r, loc in ports])
        if b.get("wait"):
            why = await tunnel.first_attempt()
            if why is not None:
                self.table.tunnels.pop(tid, None)
                await tunnel.close(f"first connection failed: {why}")
                raise ApiError(502, "tunnel-failed", f"the tunnel to {spec.vm} did not come "
                               f"up: {why}")
        return 201, {"tunnel": tunnel.describe()}

    @route("DELETE", "/v1/tunnels/{id}")
    async def close_tunnel(self, body: bytes, tid: str) -> Result:
        tunnel = self.table.tunnels.pop(tid, None)
        if tunnel is None:
            raise ApiError(404, "not-found", f"no tunnel {tid!r}")
        await tunnel.close("closed by request")
        return 200, {"tunnel": tunnel.describe()}


#: The API's routes, as declared on the operations above.
ROUTES = routes_of(ConnectResource)


def connect_site(resource: IResource, *, reactor: Any, max_body: int,
                 idle_timeout: float, request_timeout: float) -> JsonSite:
    """connect's site (``resource``: the API, or the :class:`~ticrypt.connect.page.PageRoot`
    over it); wrap it in a LimitedFactory to listen."""
    return JsonSite(resource, reactor=reactor, max_body=max_body, idle_timeout=idle_timeout,
                    request_timeout=request_timeout, access_namespace="ticrypt.connect.access")


__all__ = ["PAGE_OFF", "ROUTES", "Admission", "ConnectResource", "connect_site", "header_text",
           "parse_forwards"]
