"""The browser page connect serves (PROTOCOL.md §7 "The page"): its files,
its sign-in tokens and the resource tree that puts the page, the local API
and the relays on one origin, ``http://127.0.0.1:PORT``.

* :class:`PageTokens` (sans-IO, clock injected): one-time sign-in links and
  the page tokens they are exchanged for, in memory only (a restart of
  connect ends every page session).
* :class:`PageFiles`: a leaf resource serving exactly ``/`` (index.html),
  ``/app/index.html``, ``/app/app.css``, ``/app/js/NAME.js``, the xterm.js
  files under ``/vendor/`` from ``node_modules`` and :data:`APP_DATA`
  (the secure channel's error table and the close codes, from Python);
  nothing else, never a directory listing.  Every answer carries :data:`PAGE_HEADERS` (a strict
  Content-Security-Policy among them).
* :class:`PageRoot`: the site's root; ``/relay/v1/user`` goes to the
  websocket relay, page paths to :class:`PageFiles`, everything else to the
  JSON API (:mod:`ticrypt.connect.api`, which also relays ``/rest/v1/...``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import resource, server

from ticrypt import closecodes
from ticrypt.channel.errors import MESSAGES
from ticrypt.http.server import error_body

#: The folder of the page (package data), and of its npm dependencies.
WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; font-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")

#: On every answer of a page path (files and their errors).
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

#: ``/vendor/NAME`` -> file under node_modules (xterm.js and its fit addon).
VENDOR = {
    "xterm.js": "@xterm/xterm/lib/xterm.js",
    "xterm.mjs": "@xterm/xterm/lib/xterm.mjs",
    "xterm.css": "@xterm/xterm/css/xterm.css",
    "addon-fit.js": "@xterm/addon-fit/lib/addon-fit.js",
    "addon-fit.mjs": "@xterm/addon-fit/lib/addon-fit.mjs",
}

#: Page paths answered from Python data rather than a file, each imported
#: by the page as a JSON module: the secure channel's error table (code ->
#: fixed human message), whose one home is
#: :data:`ticrypt.channel.errors.MESSAGES`, for channelerror.js; and the close
#: codes (``codes``: number -> [name, human line]) with the explanations of
#: reason names that are not codes (``reasons``: name -> human line), whose
#: one home is :mod:`ticrypt.closecodes`, for closes.js.
APP_DATA: dict[str, bytes] = {
    "/app/js/channelerrors.json": json.dumps(MESSAGES, indent=1).encode(),
    "/app/js/closecodes.json": json.dumps({
        "codes": {str(c.code): [c.name, c.human] for c in closecodes.ALL},
        "reasons": closecodes.REASON_HUMAN,
    }, indent=1).encode(),
}

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}

#: ``/app/`` paths served from the web folder.
_APP_FILE = re.compile(r"index\.html|app\.css|js/[A-Za-z0-9_-]{1,64}\.js")
#: Largest file served (xterm.js is ~0.5 MB).
MAX_FILE = 8 * 1024 * 1024

#: Page paths: ``/``, ``/app/...``, ``/vendor/...`` (and the favicon browsers ask for).
PAGE_PREFIXES = (b"/app/", b"/vendor/")


def is_page_path(path: bytes) -> bool:
    return path in (b"/", b"/favicon.ico") or path.startswith(PAGE_PREFIXES)


def web_file(web_dir: str, path: str) -> str | None:
    """The file behind page ``path`` (``/``, ``/app/...``, ``/vendor/...``)
    relative to ``web_dir``, or None when it is not one we serve."""
    if path == "/":
        return "index.html"
    if path.startswith("/app/") and _APP_FILE.fullmatch(path[5:]):
        return path[5:]
    if path.startswith("/vendor/") and path[8:] in VENDOR:
        return "node_modules/" + VENDOR[path[8:]]
    return None


def vendor_missing(web_dir: str = WEB_DIR) -> list[str]:
    """The vendor files (``/vendor/NAME``) missing under ``web_dir``."""
    return [name for name, rel in VENDOR.items()
            if not os.path.isfile(os.path.join(web_dir, "node_modules", rel))]


# ---------------------------------------------------------------- tokens

def _digest(secret: str) -> bytes:
    # looked up by digest: a dict probe on the secret itself could leak
    # timing about stored secrets
    return hashlib.sha256(secret.encode("utf-8", "replace")).digest()


@attrs.define
class PageTokens:
    """One-time links and page tokens, in memory.

    ``new_link()`` makes a link (32 random bytes, b64url) valid ``link_ttl``
    seconds; ``redeem(link)`` exchanges it, once, for a page token valid
    ``session_ttl`` seconds; ``valid(token)`` checks a page token.  At most
    ``max_links`` links and ``max_sessions`` tokens are kept (the oldest go
    first)."""

    clock: IReactorTime
    link_ttl: float
    session_ttl: float
    max_links: int = 64
    max_sessions: int = 256
    random: Callable[[int], str] = secrets.token_urlsafe
    _links: OrderedDict[bytes, float] = attrs.field(factory=OrderedDict)
    _sessions: OrderedDict[bytes, float] = attrs.field(factory=OrderedDict)

    def _now(self) -> float:
        return self.clock.seconds()

    def _prune(self, table: OrderedDict[bytes, float], cap: int) -> None:
        now = self._now()
        for key in [k for k, exp in table.items() if exp <= now]:
            del table[key]
        while len(table) >= cap:
            table.popitem(last=False)

    def new_link(self) -> tuple[str, float]:
        """A fresh one-time link and when it expires."""
        self._prune(self._links, self.max_links)
        link = self.random(32)
        expires = self._now() + self.link_ttl
        self._links[_digest(link)] = expires
        return link, expires

    def redeem(self, link: str) -> tuple[str, float] | None:
        """A page token and its expiry for ``link`` (used up), or None for a
        link that is unknown, used or expired."""
        expires = self._links.pop(_digest(link), None)
        if expires is None or expires <= self._now():
            return None
        self._prune(self._sessions, self.max_sessions)
        token = self.random(32)
        until = self._now() + self.session_ttl
        self._sessions[_digest(token)] = until
        return token, until

    def valid(self, token: str) -> bool:
        expires = self._sessions.get(_digest(token))
        if expires is None:
            return False
        if expires <= self._now():
            del self._sessions[_digest(token)]
            return False
        return True

    def __len__(self) -> int:
        return len(self._sessions)


# ---------------------------------------------------------------- files

def set_page_headers(request: server.Request) -> None:
    for name, value in PAGE_HEADERS.items():
        request.setHeader(name, value)


class PageFiles(resource.Resource):
    """The page's files (GET and HEAD), after the Host check of
    ``check_host(request) -> error message or None``."""

    isLeaf = True
    log = Logger()

    def __init__(self, web_dir: str, check_host: Callable[[server.Request], str | None],
                 enabled: bool = True):
        super().__init__()
        self.web_dir = web_dir
        self._check_host = check_host
        self._enabled = enabled

    def render(self, request: server.Request) -> bytes:
        set_page_headers(request)
        problem = self._check_host(request)
        if problem is not None:
            return self._error(request, 403, problem, "this page is served only as "
                               "http://127.0.0.1:PORT of ticrypt-connect")
        if not self._enabled:
            return self._error(request, 503, "page-disabled", "the page is off: set [page] "
                               "rest_url in connect.ini")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader("Allow", "GET, HEAD")
            return self._error(request, 405, "method-not-allowed", "only GET and HEAD")
        path = request.path.decode("ascii", "replace")
        data = APP_DATA.get(path)
        if data is not None:
            request.setHeader("Content-Type", "application/json")
            return data
        rel = web_file(self.web_dir, path)
        if rel is None:
            return self._error(request, 404, "not-found", "no such file")
        try:
            with open(os.path.join(self.web_dir, rel), "rb") as f:
                data = f.read(MAX_FILE + 1)
        except OSError:
            if rel.startswith("node_modules/"):
                return self._error(request, 404, "not-installed", "the page's npm "
                                   "dependencies are not installed (run npm ci in "
                                   "ticrypt/connect/web, or ./dev)")
            return self._error(request, 404, "not-found", "no such file")
        if len(data) > MAX_FILE:
            return self._error(request, 500, "too-large", "file too large")
        request.setHeader("Content-Type", _TYPES[os.path.splitext(rel)[1]])
        return data

    def _error(self, request: server.Request, status: int, code: str, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader("Content-Type", "application/json")
        return error_body(code, message)


class PageRoot(resource.Resource):
    """The site's root: ``/relay/v1/user`` -> ``relay``, ``/rest/...`` ->
    ``rest``, page paths -> ``files``, everything else -> ``api`` (leaf
    resources all)."""

    RELAY_PATH = b"/relay/v1/user"

    def __init__(self, api: resource.IResource, files: resource.IResource,
                 relay: resource.IResource, rest: resource.IResource):
        super().__init__()
        self.api = api
        self.files = files
        self.relay = relay
        self.rest = rest

    def getChildWithDefault(self, path: bytes, request: Any) -> resource.IResource:
        if request.path == self.RELAY_PATH:
            return self.relay
        if request.path.startswith(b"/rest/"):
            return self.rest
        if is_page_path(request.path):
            return self.files
        return self.api

    def render(self, request: server.Request) -> bytes:  # an empty path: not HTTP/1.1
        return self.files.render(request)  # type: ignore[no-any-return]


__all__ = ["APP_DATA", "CSP", "PAGE_HEADERS", "VENDOR", "WEB_DIR", "PageFiles", "PageRoot", "PageTokens",
           "is_page_path", "set_page_headers", "vendor_missing", "web_file"]
