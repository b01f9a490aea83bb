"""The allow-list's DNS policy, sans-IO: which names a VM may resolve, to
what, and how often.

* :func:`question` reads the first question of a raw DNS query *as labels*
  (a dot inside a label, an embedded NUL or a raw UTF-8 byte is kept
  visible, where a decoded name would hide it).
* :func:`entry_name` checks that an entry's name is in the canonical form of
  :mod:`ticrypt.dnsname` (rest's: lower case, no trailing dot, canonical
  IDNA A-labels only); ``*.example.org`` covers one or more labels before
  ``example.org`` (``a.example.org``, ``a.b.example.org``), never
  ``example.org`` itself (PROTOCOL.md §1.1).
* :class:`Policy` decides each query: an answer (the name's forwarding
  address), NODATA, NXDOMAIN or REFUSED, PENDING (the name is allowed but
  the firewall does not admit it yet: answer only once it does), or DROP
  (from outside ``vm_networks``, or over the client's rate).

Lookalikes never match: a query name matches an entry only when every label
is letters, digits, ``-`` or ``_`` and equal to the entry's label after ASCII
case folding.  So an embedded NUL, a dot inside a label, a U-label (raw
UTF-8, homoglyphs included), full-width dots and another punycode spelling
(``xn--...`` is compared as the literal A-label) are all refused.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import attrs

from ticrypt import dnsname

__all__ = ["Decision", "Entry", "Kind", "Policy", "TokenBuckets", "entry_name", "parse_entry",
           "question"]

MAX_NAME = 253
MAX_PORTS = 32
MAX_COMMENT = 200
_LDH = re.compile(rb"[A-Za-z0-9_-]{1,63}\Z")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# DNS constants (RFC 1035) the policy needs; the server uses twisted.names'.
A, CNAME, AAAA, ANY = 1, 5, 28, 255
IN = 1


@attrs.frozen
class Question:
    """The first question of a query: raw labels, type, class."""

    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    #: offset just after the question in the message (the reply echoes it)
    end: int = attrs.field(default=0, eq=False)


def question(data: bytes) -> Question | None:
    """The single question of a query message, or None when ``data`` is not
    one well-formed query with exactly one question (compression pointers
    are not allowed in it: nothing precedes it to point at)."""
    if len(data) < 12 or data[2] & 0x80:  # a response, not a query
        return None
    if int.from_bytes(data[4:6], "big") != 1:
        return None
    labels: list[bytes] = []
    i, total = 12, 0
    while True:
        if i >= len(data):
            return None
        n = data[i]
        i += 1
        if n == 0:
            break
        if n > 63:
            return None
        label = data[i:i + n]
        if len(label) != n:
            return None
        total += n + 1
        if total > MAX_NAME + 1:
            return None
        labels.append(label)
        i += n
    if i + 4 > len(data):
        return None
    return Question(tuple(labels), int.from_bytes(data[i:i + 2], "big"),
                    int.from_bytes(data[i + 2:i + 4], "big"), i + 4)


@functools.lru_cache(maxsize=4096)
def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def reply(query: bytes, q: Question, rcode: int, addresses: Iterable[str] = (), *,
          ttl: int = 60, authoritative: bool = True, max_size: int = 0) -> bytes:
    """The reply to ``query`` (whose question is ``q``): header, the question
    echoed byte for byte, one A/AAAA record per address (name compressed to
    the question's).  No EDNS0 OPT record (RFC 6891 permits a responder
    without it).  Over ``max_size`` (when not 0) the records are left out
    and TC is set."""
    opcode = (query[2] >> 3) & 0x0F
    rd = query[2] & 0x01
    records = []
    for a in addresses:
        packed = _packed(a)
        rtype = A if len(packed) == 4 else AAAA
        records.append(b"\xc0\x0c" + rtype.to_bytes(2, "big") + IN.to_bytes(2, "big")
                       + ttl.to_bytes(4, "big") + len(packed).to_bytes(2, "big") + packed)
    body = query[12:q.end]
    tc = 0
    if max_size and 12 + len(body) + sum(map(len, records)) > max_size:
        records, tc = [], 1
    flags = bytes([0x80 | (opcode << 3) | (int(authoritative) << 2) | (tc << 1) | rd,
                   0x80 | (rcode & 0x0F)])
    header = query[:2] + flags + b"\x00\x01" + len(records).to_bytes(2, "big") + b"\x00\x00" * 2
    return header + body + b"".join(records)


def canonical(labels: Iterable[bytes]) -> str | None:
    """The lower-case dotted name when every label is plain letters, digits,
    ``-`` or ``_`` (the only names that can match), else None."""
    out = []
    for label in labels:
        if not _LDH.match(label):
            return None
        out.append(label.decode("ascii").lower())
    return ".".join(out) if out else None


def entry_name(name: str) -> str:
    """``name`` checked as a canonical entry name (:func:`ticrypt.dnsname.canonical_name`
    and already in that form); ValueError says why not."""
    if not isinstance(name, str):
        raise ValueError("name must be a string")
    canonical_form = dnsname.canonical_name(name)
    if canonical_form != name:
        raise ValueError(f"name {name[:80]!r} is not in canonical form ({canonical_form!r})")
    return name


@attrs.frozen
class Entry:
    """One allow-list entry (as rest's feed carries it)."""

    id: str
    name: str
    ports: tuple[int, ...]
    protocol: str = "tcp"
    comment: str = ""

    @property
    def wildcard(self) -> bool:
        return self.name.startswith("*.")

    def covers(self, name: str) -> bool:
        return dnsname.covers(self.name, name)


def parse_entry(raw: object) -> Entry:
    """One feed entry checked; ValueError names the problem."""
    if not isinstance(raw, Mapping):
        raise ValueError("entry is not an object")
    ident, name, ports = raw.get("id"), raw.get("name"), raw.get("ports")
    protocol, comment = raw.get("protocol", "tcp"), raw.get("comment", "")
    if not isinstance(ident, str) or not re.fullmatch(r"al-[0-9a-f]{1,64}", ident):
        raise ValueError("entry id must be al-<hex>")
    if not isinstance(ports, list) or not 1 <= len(ports) <= MAX_PORTS or not all(
            type(p) is int and 1 <= p <= 65535 for p in ports):
        raise ValueError(f"entry {ident}: ports must be 1..{MAX_PORTS} ports 1..65535")
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"entry {ident}: protocol must be tcp or udp")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise ValueError(f"entry {ident}: comment must be a string of at most {MAX_COMMENT}")
    try:
        entry_name(name)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"entry {ident}: {e}") from None
    assert isinstance(name, str)
    return Entry(ident, name, tuple(sorted(set(ports))), protocol, comment)


class TokenBuckets:
    """Per-key token buckets (``rate`` per second, ``burst`` deep), at most
    ``max_keys`` keys (the least recently seen is forgotten first, so
    spoofed sources cannot exhaust memory)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 65536) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return ok


class Kind(enum.Enum):
    ANSWER = "answer"      # the name's forwarding address(es)
    NODATA = "nodata"      # allowed name, no record of that type
    PENDING = "pending"    # allowed, the firewall does not admit it yet
    NXDOMAIN = "nxdomain"  # not allowed (refused_answer = nxdomain)
    REFUSED = "refused"    # not allowed (refused_answer = refused), or not IN
    DROP = "drop"          # outsider or over rate: no answer at all


@attrs.frozen
class Decision:
    kind: Kind
    name: str | None = None
    entry: Entry | None = None
    addresses: tuple[str, ...] = ()
    why: str = ""


class Policy:
    """Entries + admitted names -> a :class:`Decision` per query.

    ``admitted`` maps each name the firewall admits now to its forwarding
    address; :mod:`ticrypt.allowedlist.sync` sets it after each install."""

    def __init__(self, vm_networks: Iterable[str], *, refused_answer: str = "nxdomain",
                 rate: float = 50.0, burst: float = 100.0, max_clients: int = 65536) -> None:
        self.vm_networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in vm_networks)
        if refused_answer not in ("nxdomain", "refused"):
            raise ValueError("refused_answer must be nxdomain or refused")
        self._refused = Kind.NXDOMAIN if refused_answer == "nxdomain" else Kind.REFUSED
        self.buckets = TokenBuckets(rate, burst, max_clients)
        self._entries: tuple[Entry, ...] = ()
        self._inside: dict[str, bool] = {}
        self._exact: dict[str, Entry] = {}
        self._wild: dict[str, Entry] = {}
        self.admitted: dict[str, str] = {}
        #: when each wildcard-covered name was last answered (the DNS side
        #: stamps it; the sync forgets names idle for ``wildcard_idle``)
        self.seen: dict[str, float] = {}

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self._entries

    def set_entries(self, entries: Iterable[Entry]) -> None:
        """All entries (a name may have several: one per protocol)."""
        self._entries = tuple(entries)
        exact: dict[str, Entry] = {}
        wild: dict[str, Entry] = {}
        for e in self._entries:
            if e.wildcard:
                wild.setdefault(e.name[2:], e)
            else:
                exact.setdefault(e.name, e)
        self._exact, self._wild = exact, wild

    def inside(self, host: str) -> bool:
        """Whether ``host`` is in ``vm_networks`` (cached: parsing an address
        was most of the cost of a query)."""
        known = self._inside.get(host)
        if known is None:
            if len(self._inside) >= 65536:
                self._inside.clear()
            known = self._inside[host] = self._inside_uncached(host)
        return known

    def _inside_uncached(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.vm_networks)

    def match(self, name: str) -> Entry | None:
        """The entry covering ``name``: an exact one first, else the
        wildcard with the longest suffix."""
        entry = self._exact.get(name)
        if entry is not None or not self._wild:
            return entry
        labels = name.split(".")
        for i in range(1, len(labels) - 1):
            entry = self._wild.get(".".join(labels[i:]))
            if entry is not None:
                return entry
        return None

    def admit(self, client: str, now: float) -> Decision | None:
        """A DROP decision for an outsider or a client over its rate."""
        if not self.inside(client):
            return Decision(Kind.DROP, why="outside")
        if not self.buckets.take(client, now):
            return Decision(Kind.DROP, why="rate")
        return None

    def decide(self, client: str, q: Question, now: float) -> Decision:
        dropped = self.admit(client, now)
        if dropped is not None:
            return dropped
        return self.answer(q)

    def answer(self, q: Question) -> Decision:
        """The decision for an admitted client's question."""
        if q.qclass != IN:
            return Decision(Kind.REFUSED, why="class")
        name = canonical(q.labels)
        entry = self.match(name) if name is not None else None
        if entry is None or name is None:
            return Decision(self._refused, name=name, why="not-allowed")
        address = self.admitted.get(name)
        if address is None:
            return Decision(Kind.PENDING, name=name, entry=entry)
        version = 6 if ":" in address else 4
        if q.qtype == ANY or (q.qtype == A and version == 4) or (q.qtype == AAAA and version == 6):
            return Decision(Kind.ANSWER, name=name, entry=entry, addresses=(address,))
        return Decision(Kind.NODATA, name=name, entry=entry)
