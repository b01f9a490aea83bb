"""HTTP pieces two or more roles share: the bounded, CA-pinned JSON client
(:mod:`ticrypt.http.client`), the poller of a feed at rest
(:mod:`ticrypt.http.feed`), bearer secrets shared by two daemons and the
check of a feed reader's settings."""

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


def feed_settings_problem(rest_url: str | None, *, ca_file: str | None, allow_plain: bool,
                          secret: str | None, secret_key: str) -> tuple[str, str] | None:
    """What is wrong with the settings of a role that reads a feed at rest
    (the proxy's revocation feed, allowedlist's entries), as (key, why), or
    None: an https ``rest_url`` needs ``ca_file``, an http one
    ``allow_plain``, and the bearer secret file (key ``secret_key``) must
    hold a secret (:func:`load_secret`).  Nothing to check without a
    ``rest_url``."""
    if rest_url is None:
        return None
    if rest_url.startswith("https:") and ca_file is None:
        return "ca_file", "an https rest_url needs the CA file"
    if rest_url.startswith("http:") and not allow_plain:
        return "rest_url", "http:// needs allow_plain = yes; use https://"
    if secret is None:
        return secret_key, "missing: rest_url is set, so the feed's bearer secret is needed"
    try:
        load_secret(secret)
    except ValueError as e:
        return secret_key, str(e)
    return None
