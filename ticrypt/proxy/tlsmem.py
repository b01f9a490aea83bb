"""Per-connection TLS memory of the proxy's listener.

Idle websockets are what the proxy holds most of (thousands of VM sockets
waiting to be paired), so what OpenSSL keeps per idle connection matters:

* :func:`lean_server_context` makes sure the listener's context has
  ``SSL_MODE_RELEASE_BUFFERS`` (OpenSSL frees a connection's record
  read/write buffers while it has nothing buffered; Twisted's
  ``CertificateOptions`` sets it today, this keeps it so and is tested),
  ``SSL_OP_NO_TICKET`` and the server session cache off (no session
  resumption: a relay of long-lived sockets gains nothing from it, and no
  session state is kept per handshake).

* :func:`release_bio_buffers`: Twisted drives OpenSSL through a pair of
  memory BIOs per connection.  A memory BIO never shrinks its buffer, so each
  keeps the size of the largest burst that crossed it -- the TLS handshake
  flights (ClientHello with an X25519MLKEM768 key share, the server's
  certificate chain).  Once the connection is idle and both BIOs are empty,
  they can be replaced by fresh, empty ones (``SSL_set_bio`` frees the old
  pair); nothing about the TLS session changes.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.logger import Logger

from ticrypt.tlsutil import server_context

log = Logger()

try:  # the cffi bindings pyOpenSSL itself uses
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _HAVE_BIO_API = all(hasattr(_lib, n) for n in
                        ("BIO_new", "BIO_s_mem", "BIO_get_mem_data", "SSL_set_bio"))
except ImportError:  # pragma: no cover - depends on the installed pyOpenSSL
    _HAVE_BIO_API = False

#: context options and modes the listener must have (checked by tests)
REQUIRED_MODE = SSL.MODE_RELEASE_BUFFERS
REQUIRED_OPTIONS = SSL.OP_NO_TICKET


def context_mode(ctx: SSL.Context) -> int:
    """The ``SSL_CTX`` mode bits (pyOpenSSL has a setter only)."""
    return int(_lib.SSL_CTX_set_mode(ctx._context, 0))


def lean_server_context(ctx: SSL.Context) -> SSL.Context:
    """Set RELEASE_BUFFERS, no session tickets and no session cache on the
    server context ``ctx`` (idempotent); returns it."""
    ctx.set_mode(REQUIRED_MODE)
    ctx.set_options(REQUIRED_OPTIONS)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


def lean_endpoint(endpoint: Any) -> Any:
    """If ``endpoint`` is a Twisted ``ssl:`` server endpoint, apply
    :func:`lean_server_context` to the context its connections will use
    (``CertificateOptions`` caches the one context it hands to every
    ``TLSMemoryBIOProtocol``).  Other endpoints are returned unchanged."""
    ctx = server_context(endpoint)
    if ctx is not None:
        lean_server_context(ctx)
    return endpoint


def _pending(bio: Any) -> int:
    return int(_lib.BIO_get_mem_data(bio, _ffi.new("char **")))


def release_bio_buffers(conn: Any) -> bool:
    """Give the established TLS connection ``conn`` (a pyOpenSSL
    ``Connection`` on memory BIOs) fresh empty memory BIOs, freeing the old
    ones and their buffers.  Only when both hold no data; returns whether it
    did."""
    if not _HAVE_BIO_API or not isinstance(conn, SSL.Connection):
        return False
    into, out = getattr(conn, "_into_ssl", None), getattr(conn, "_from_ssl", None)
    if into is None or out is None or _ffi.NULL in (into, out):
        return False  # a socket connection, or a pyOpenSSL without memory BIOs
    if _pending(into) or _pending(out):
        return False
    new_in = _lib.BIO_new(_lib.BIO_s_mem())
    new_out = _lib.BIO_new(_lib.BIO_s_mem())
    if new_in == _ffi.NULL or new_out == _ffi.NULL:
        for bio in (new_in, new_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    # both differ from the current pair: SSL_set_bio frees the old two
    _lib.SSL_set_bio(conn._ssl, new_in, new_out)
    conn._into_ssl, conn._from_ssl = new_in, new_out
    return True
