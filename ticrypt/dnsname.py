"""DNS names of the license-server allow-list, in one canonical form.

An allow-listed name is stored and compared in IDNA A-label form: ASCII,
lower case, without the trailing dot.  :func:`canonical_name` turns what an
operator typed into that form or refuses it with one line saying why;
:func:`covers` says whether an allow-listed name (exact or wildcard) covers
a queried name.  Lookalikes never pass: an embedded NUL or any other byte
outside letters, digits and hyphens, a non-ASCII (U-label) name (give it
as punycode), an ``xn--`` label that is not the canonical punycode of a
valid IDNA label, an empty label.

A wildcard ``*.example.org`` covers every name with one or more labels
before ``example.org`` (``a.example.org``, ``a.b.example.org``), never
``example.org`` itself; it needs at least two labels after the ``*``.

Pure functions, no I/O: rest validates entries with them, the allowedlist
daemon compares queries with them.
"""

from __future__ import annotations

import re

import idna

__all__ = ["MAX_NAME", "canonical_name", "covers", "is_wildcard"]

#: longest name in presentation form, without the trailing dot (RFC 1035)
MAX_NAME = 253
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


def _check_label(label: str) -> None:
    if not label:
        raise ValueError("has an empty label")
    if not _LABEL.match(label):
        raise ValueError(f"label {label!r} is not letters, digits and inner hyphens "
                         "(at most 63)")
    if label[2:4] == "--":
        if not label.startswith("xn--"):
            raise ValueError(f"label {label!r} has '--' in positions 3-4 but is not xn--")
        try:
            ulabel = idna.decode(label)
            again = idna.encode(ulabel).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise ValueError(f"label {label!r} is not valid punycode of an IDNA label") from None
        if again != label:
            raise ValueError(f"label {label!r} is not the canonical punycode of {ulabel!r}")


def canonical_name(text: str, *, wildcard: bool = True) -> str:
    """``text`` as a canonical allow-list name (ValueError with the reason)."""
    if not isinstance(text, str):
        raise ValueError("must be a string")
    if not text.isascii():
        raise ValueError("is not ASCII: give an internationalised name in its "
                         "punycode (xn--) form")
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("is empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"is longer than {MAX_NAME} characters")
    labels = name.split(".")
    if labels[0] == "*":
        if not wildcard:
            raise ValueError("may not be a wildcard")
        labels = labels[1:]
        if len(labels) < 2:
            raise ValueError("a wildcard needs at least two labels after '*.'")
    for label in labels:
        _check_label(label)
    if labels[-1].isdigit():
        raise ValueError("is not a DNS name (the last label is numeric)")
    return name


def is_wildcard(name: str) -> bool:
    return name.startswith("*.")


def covers(entry: str, query: str) -> bool:
    """Whether the canonical allow-list name ``entry`` covers the (already
    canonical) queried name ``query``."""
    if is_wildcard(entry):
        suffix = entry[1:]  # ".example.org"
        return query.endswith(suffix) and len(query) > len(suffix)
    return query == entry
