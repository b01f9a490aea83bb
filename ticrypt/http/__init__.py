"""HTTP pieces two or more roles share: the bounded, CA-pinned JSON client
(:mod:`ticrypt.http.client`) and bearer secrets shared by two daemons."""

from __future__ import annotations

#: Characters of a shared bearer secret: printable ASCII without spaces.
_MIN_SECRET, _MAX_SECRET = 32, 1024


def load_secret(path: str) -> str:
    """The bearer secret in ``path`` (one line, surrounding whitespace
    ignored): 32 to 1024 printable ASCII characters without spaces, e.g. the
    output of ``openssl rand -hex 32``.  ValueError naming what is wrong
    (never the secret)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SECRET + 2)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    text = raw.strip()
    if len(raw) > _MAX_SECRET + 1 or not _MIN_SECRET <= len(text) <= _MAX_SECRET:
        raise ValueError(f"{path} must hold one secret of {_MIN_SECRET} to {_MAX_SECRET} "
                         "characters (e.g. openssl rand -hex 32)")
    if not all(0x21 <= c <= 0x7E for c in text):
        raise ValueError(f"{path} must hold printable ASCII without spaces")
    return text.decode("ascii")
