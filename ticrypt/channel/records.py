"""Record layer: AES-256-GCM with counter nonces, one key per direction.

Wire format of one record (a binary websocket message)::

    0x01 || seq (8 bytes, big-endian) || AES-256-GCM(key, nonce, plaintext, aad)

with ``nonce = 4 zero bytes || seq`` and ``aad = 0x01 || seq``. Sequence
numbers start at 0 in each direction and the receiver accepts only the next
one, so replays, drops and reordering are all fatal.
"""

from __future__ import annotations

import attrs

from ticrypt.channel.errors import ChannelError
from ticrypt.channel.primitives import GCM_TAG_SIZE, aesgcm_open, aesgcm_seal

RECORD_VERSION = 1
#: Bytes before the ciphertext: version byte and sequence number.
HEADER_SIZE = 1 + 8
#: Shortest possible record: header plus the GCM tag of an empty plaintext.
MIN_RECORD_SIZE = HEADER_SIZE + GCM_TAG_SIZE
MAX_PLAINTEXT = 1048576
#: Records per direction and per channel (well below GCM's limits for one key).
MAX_RECORDS = 2**32


def _nonce_and_aad(seq: int) -> tuple[bytes, bytes]:
    seq_bytes = seq.to_bytes(8, "big")
    return b"\x00" * 4 + seq_bytes, bytes([RECORD_VERSION]) + seq_bytes


def _check_max_records(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= 2**64:
        raise ValueError("max_records must be between 1 and 2**64")


@attrs.define
class _Direction:
    """One direction's key and how many records it may carry."""

    _key: bytes = attrs.field(repr=False)
    max_records: int = attrs.field(default=MAX_RECORDS, validator=_check_max_records)


@attrs.define
class RecordSealer(_Direction):
    """Seals the records of one direction."""

    next_seq: int = 0

    def seal(self, plaintext: bytes) -> bytes:
        """The next record carrying ``plaintext``.

        ValueError (nothing consumed) if ``plaintext`` is over MAX_PLAINTEXT;
        ChannelError("counter-exhausted") once ``max_records`` were sealed.
        """
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError(f"plaintext over {MAX_PLAINTEXT} bytes")
        seq = self.next_seq
        if seq >= self.max_records:
            raise ChannelError("counter-exhausted")
        nonce, aad = _nonce_and_aad(seq)
        record = aad + aesgcm_seal(self._key, nonce, plaintext, aad)
        self.next_seq = seq + 1
        return record


@attrs.define
class RecordOpener(_Direction):
    """Opens the records of one direction, strictly in order."""

    expected_seq: int = 0

    def open(self, record: bytes) -> bytes:
        """The plaintext of ``record``, or ChannelError; state only advances on success."""
        if len(record) < MIN_RECORD_SIZE or record[0] != RECORD_VERSION:
            raise ChannelError("bad-record")
        if len(record) - MIN_RECORD_SIZE > MAX_PLAINTEXT:
            raise ChannelError("record-too-large")
        expected = self.expected_seq
        if expected >= self.max_records:
            raise ChannelError("counter-exhausted")
        seq = int.from_bytes(record[1:HEADER_SIZE], "big")
        if seq < expected:
            raise ChannelError("replay")
        if seq > expected:
            raise ChannelError("out-of-order")
        nonce, aad = _nonce_and_aad(seq)
        # (a view: no copy of the ciphertext)
        plaintext = aesgcm_open(self._key, nonce, memoryview(record)[HEADER_SIZE:], aad)
        self.expected_seq = expected + 1
        return plaintext
