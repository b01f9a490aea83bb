"""TLS under a mux: Twisted's memory-BIO TLS with per-record Python work batched.

Twisted's ``TLSMemoryBIOProtocol`` costs a few Python calls per 16 KiB TLS
record both ways: it hands every decrypted record to the protocol on its
own, and after encrypting each record it reads the send BIO and writes the
result to the TCP transport.  Under a bulk transfer that per-record work,
not the cipher, was most of a mux end's CPU (profiled with ``bench/
bench_tunnel.py``).  :class:`MuxTLSProtocol` keeps every behaviour of the
base class (handshake, shutdown, errors, pending writes, producers) and
changes only the batching:

* received: the records decrypted from one read of the socket are handed
  to the protocol together, up to :data:`BATCH` bytes at a time;
* sent: one ``write`` is encrypted record by record (no copy of the input),
  then the send BIO is emptied once, into one transport write;
* the TCP socket under it reads :data:`ticrypt.forward.READ_SIZE` at once.

Bounded like the base class: the receive batch comes from one socket read
(at most ``READ_SIZE`` bytes of TLS), the send BIO holds at most one
``write`` (which the mux keeps to 256 KiB, see
:data:`ticrypt.mux.protocol.FLUSH_PIECES`).

It also is a plain ``TLSMemoryBIOProtocol``, not Twisted's default
``BufferingTLSTransport``: that one holds every write under 64 KB for a
``callLater(0)`` to merge small writes, which the mux already does (one
write per event).
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from ticrypt.forward import READ_SIZE

#: Most decrypted bytes handed to the protocol in one call.
BATCH = 256 * 1024
#: Largest TLS record payload (what one ``SSL_write`` may take).
RECORD = 2**14


class MuxTLSProtocol(TLSMemoryBIOProtocol):
    """``TLSMemoryBIOProtocol`` with batched records (see the module)."""

    def makeConnection(self, transport: Any) -> None:
        if isinstance(getattr(transport, "bufferSize", None), int):
            transport.bufferSize = READ_SIZE
        super().makeConnection(transport)

    def _flushSendBIO(self) -> None:
        """Everything in the send BIO, in one transport write (the base class
        reads at most 32 KiB, one record's worth, per call)."""
        out = []
        while True:
            try:
                chunk = self._tlsConnection.bio_read(BATCH)
            except WantReadError:
                break
            out.append(chunk)
            if len(chunk) < BATCH:
                break
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])  # type: ignore[union-attr]

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += self._tlsConnection.send(view[done : done + RECORD])
        except WantReadError:
            self._flushSendBIO()
            self._bufferedWrite(data[done:])
            return
        except Error:
            self._flushSendBIO()
            self._tlsShutdownFinished(Failure())
            return
        self._flushSendBIO()

    def _flushReceiveBIO(self) -> None:
        batch: list[bytes] = []
        size = 0
        while not self._lostTLSConnection:
            try:
                chunk = self._tlsConnection.recv(RECORD * 2)
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(batch)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                failure = Failure()
                self._deliver(batch)
                self._tlsShutdownFinished(failure)
            else:
                batch.append(chunk)
                size += len(chunk)
                if size >= BATCH:
                    self._deliver(batch)
                    size = 0
        self._deliver(batch)
        self._flushSendBIO()

    def _deliver(self, batch: list[bytes]) -> None:
        """Hand the batch to the protocol (unless aborted) and empty it."""
        if not batch:
            return
        data = b"".join(batch) if len(batch) > 1 else batch[0]
        batch.clear()
        if not self._aborted:
            ProtocolWrapper.dataReceived(self, data)


class MuxTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` making :class:`MuxTLSProtocol` connections."""

    protocol = MuxTLSProtocol


__all__ = ["BATCH", "MuxTLSFactory", "MuxTLSProtocol"]
