"""Tunnel multiplexer: many TCP-like streams over one (TLS) connection.

Shared by vmc (server end, ``side="server"``) and ticrypt-connect (client
end, ``side="client"``). Wire format: PROTOCOL.md, "Tunnel multiplexing
(port 22)".

Layers (sans-IO core, Twisted adapter):

* :mod:`ticrypt.mux.frames` -- codec, bytes <-> frame values, ``FrameError``.
* :mod:`ticrypt.mux.connection` -- ``MuxConnection``: windows, stream ids,
  stream cap, flood budgets; bytes in -> events, calls -> bytes out.
* :mod:`ticrypt.mux.protocol` -- ``MuxProtocol``: the ``Protocol`` on the TLS
  transport; one push producer round-robining streams; keepalive.
* :mod:`ticrypt.mux.stream` -- ``StreamTransport`` (what an application
  protocol sees as its transport), ``StreamEndpoint``, ``IncomingStream``.

Client side::

    mux = MuxProtocol(side="client", clock=reactor, settings=MuxSettings())
    # ... connect mux to the server over TLS (it is a plain Protocol) ...
    d = StreamEndpoint(mux, 8080).connect(factory)   # Deferred[protocol]
    # d fires once the server accepted (protocol.makeConnection(stream) done);
    # errbacks with StreamRefused(reason) when the server refuses, or
    # MuxClosed(reason) if the mux connection is (or becomes) closed first.
    mux.when_closed()        # Deferred[str]: stable reason the mux ended
    mux.stats()              # {"streams": int, "bytes_in": int, "bytes_out": int, ...}
    mux.close("normal")      # GOAWAY + close the transport

Server side::

    def on_stream(incoming: IncomingStream) -> None:
        incoming.port            # int, the port the client asked for
        incoming.accept(proto)   # proto.makeConnection(stream); held data follows
        incoming.refuse("port-not-allowed")   # client's connect() -> StreamRefused

    mux = MuxProtocol(side="server", clock=reactor, settings=..., on_stream=on_stream)

Data the client sends before the accept is held (bounded by the window) and
delivered to ``proto`` right after ``accept``. If the client resets the
stream or the mux closes before the answer, ``incoming.cancelled`` is true
and a later ``accept(proto)`` delivers ``connectionLost`` to ``proto`` at once
(so a splice closes its local TCP side); ``refuse`` becomes a no-op.
"""

from ticrypt.mux.connection import MuxConnection, MuxSettings, MuxUsageError
from ticrypt.mux.frames import FrameError
from ticrypt.mux.protocol import MuxClosed, MuxProtocol
from ticrypt.mux.stream import (
    IncomingStream,
    StreamEndpoint,
    StreamRefused,
    StreamReset,
    StreamTransport,
)

__all__ = [
    "FrameError",
    "IncomingStream",
    "MuxClosed",
    "MuxConnection",
    "MuxProtocol",
    "MuxSettings",
    "MuxUsageError",
    "StreamEndpoint",
    "StreamRefused",
    "StreamReset",
    "StreamTransport",
]
