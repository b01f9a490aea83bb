"""One config loader for every role: an ini file becomes a frozen, typed object.

Each role declares its config as frozen attrs classes: one class per
``[section]``, whose fields are declared with :func:`setting` (kind, default
and doc in the field's metadata), gathered in a :class:`RoleConfig` whose
fields are declared with :func:`section`.  A section class may also gather
the keys of a smaller settings class with :func:`group` (the proxy's
``[limits]`` holds its pairing table's and frame budget's limits), so each
default is written once, in the class that uses it::

    @attrs.frozen(kw_only=True)
    class Limits:
        max_buffered: int = setting(Size(min=4096), 256 * KiB, "...")

    @attrs.frozen(kw_only=True)
    class ProxyConfig(RoleConfig):
        proxy: ProxySection = section(ProxySection)
        limits: Limits = section(Limits, optional=True)

``load_config(path, ProxyConfig)`` returns a ``ProxyConfig``, so mypy sees
every ``cfg.section.key``.  :func:`schema_of` gives the plain
:class:`Schema` view (sections -> keys -> kinds, defaults, docs) that the
sample checks read; a :class:`Schema` also loads on its own, untyped, into
a :class:`Config` (``ticrypt keygen`` reads one key that way).  Loading
refuses anything it does not understand and reports one line that names the
file, the section and the key, and what was expected::

    etc/rest.ini: [rest] listen: expected a server endpoint string, got 'tcp:x' (...)

Nothing falls back to a permissive default: a key without a default is
required, unknown sections and keys are errors, duplicates are errors.
Relative paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar, overload
from urllib.parse import urlsplit

import attrs

__all__ = [
    "REQUIRED",
    "Bool",
    "ClientEndpoint",
    "Choice",
    "ConfigError",
    "Config",
    "DirPath",
    "Duration",
    "FilePath",
    "Int",
    "Key",
    "Port",
    "RoleConfig",
    "PortRange",
    "Schema",
    "ServerEndpoint",
    "Size",
    "Str",
    "StrList",
    "Url",
    "check_file_mode",
    "group",
    "load_config",
    "schema_of",
    "section",
    "setting",
]


class ConfigError(Exception):
    """A config file is unusable; ``str()`` is the one line to show."""

    def __init__(self, path: str, section: str | None, key: str | None, message: str):
        self.path = path
        self.section = section
        self.key = key
        self.message = message
        where = path
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {message}")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@attrs.frozen
class _Ctx:
    """Where a value comes from, for kinds that resolve paths, and whether
    endpoint strings are parsed (:attr:`RoleConfig.parse_endpoints`)."""

    base_dir: str
    parse_endpoints: bool = True


class Kind:
    """A value type: ``parse(raw, ctx)`` returns the value or raises ValueError."""

    expected: str = "a value"

    def parse(self, raw: str, ctx: _Ctx) -> Any:
        raise NotImplementedError


@attrs.frozen
class Str(Kind):
    allow_empty: bool = False
    pattern: str | None = None
    max_length: int = 4096

    @property
    def expected(self) -> str:  # type: ignore[override]
        if self.pattern:
            return f"a string matching {self.pattern}"
        return "a non-empty string" if not self.allow_empty else "a string"

    def parse(self, raw: str, ctx: _Ctx) -> str:
        if not raw and not self.allow_empty:
            raise ValueError("empty")
        if len(raw) > self.max_length:
            raise ValueError(f"longer than {self.max_length} characters")
        if self.pattern and not re.fullmatch(self.pattern, raw):
            raise ValueError(f"{raw!r} does not match")
        return raw


@attrs.frozen
class StrList(Kind):
    """Comma-separated list of non-empty strings."""

    allow_empty: bool = True
    expected: str = "a comma-separated list"

    def parse(self, raw: str, ctx: _Ctx) -> tuple[str, ...]:
        items = tuple(p.strip() for p in raw.split(",") if p.strip())
        if not items and not self.allow_empty:
            raise ValueError("empty list")
        return items


@attrs.frozen
class Choice(Kind):
    choices: tuple[str, ...]

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(self.choices)

    def parse(self, raw: str, ctx: _Ctx) -> str:
        if raw not in self.choices:
            raise ValueError(f"got {raw!r}")
        return raw


@attrs.frozen
class Int(Kind):
    min: int | None = None
    max: int | None = None

    @property
    def expected(self) -> str:  # type: ignore[override]
        lo = "-inf" if self.min is None else str(self.min)
        hi = "inf" if self.max is None else str(self.max)
        return f"an integer in {lo}..{hi}"

    def parse(self, raw: str, ctx: _Ctx) -> int:
        if not re.fullmatch(r"[+-]?\d+", raw):
            raise ValueError(f"got {raw!r}")
        value = int(raw)
        if (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        ):
            raise ValueError(f"got {value}")
        return value


@attrs.frozen
class Port(Kind):
    allow_zero: bool = False

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "a TCP port 0..65535" if self.allow_zero else "a TCP port 1..65535"

    def parse(self, raw: str, ctx: _Ctx) -> int:
        return Int(0 if self.allow_zero else 1, 65535).parse(raw, ctx)


@attrs.frozen
class PortRange(Kind):
    """``6000-6100``: inclusive, low <= high, both valid ports."""

    expected: str = "a port range LOW-HIGH with 1 <= LOW <= HIGH <= 65535"

    def parse(self, raw: str, ctx: _Ctx) -> tuple[int, int]:
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", raw)
        if not m:
            raise ValueError(f"got {raw!r}")
        lo, hi = int(m.group(1)), int(m.group(2))
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
            raise ValueError(f"got {raw!r}")
        if lo > hi:
            raise ValueError(f"reversed range {raw!r}")
        return (lo, hi)


@attrs.frozen
class PortList(Kind):
    """``2022, 8080``: distinct TCP ports 1..65535, at most 64."""

    expected: str = "a comma-separated list of TCP ports 1..65535 (at most 64)"

    def parse(self, raw: str, ctx: _Ctx) -> tuple[int, ...]:
        items = [p.strip() for p in raw.split(",") if p.strip()]
        ports = tuple(dict.fromkeys(Port().parse(p, ctx) for p in items))
        if len(ports) > 64:
            raise ValueError(f"{len(ports)} ports")
        return ports


@attrs.frozen
class NetworkList(Kind):
    """``10.77.9.0/24, 10.77.1.2, fd00::/64``: IP networks (a bare address
    is a /32 or /128; host bits are cleared; IPv4-mapped IPv6 counts as
    IPv4), as normalised strings, at most ``max_items``; empty only if
    ``allow_empty``."""

    allow_empty: bool = True
    max_items: int = 256
    expected: str = "a comma-separated list of IP networks such as 10.77.9.0/24"

    def parse(self, raw: str, ctx: _Ctx) -> tuple[str, ...]:
        items = [p.strip() for p in raw.split(",") if p.strip()]
        if not items and not self.allow_empty:
            raise ValueError("empty list")
        if len(items) > self.max_items:
            raise ValueError(f"{len(items)} networks (at most {self.max_items})")
        nets: list[str] = []
        for item in items:
            try:
                net = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP network") from None
            if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
                mapped = net.network_address.ipv4_mapped
                net = ipaddress.ip_network(f"{mapped}/{max(0, net.prefixlen - 96)}", strict=False)
            nets.append(str(net))
        return tuple(dict.fromkeys(nets))


_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@attrs.frozen
class Duration(Kind):
    """Seconds as a float: ``30``, ``2.5s``, ``500ms``, ``5m``, ``1h``; > 0."""

    min: float = 0.0
    max: float | None = None
    expected: str = "a positive duration such as 30, 2.5s, 500ms, 5m or 1h"

    def parse(self, raw: str, ctx: _Ctx) -> float:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?", raw.strip())
        if not m:
            raise ValueError(f"got {raw!r}")
        value = float(m.group(1)) * _UNITS[m.group(2) or ""]
        if value <= 0 or value < self.min or (self.max is not None and value > self.max):
            raise ValueError(f"got {raw!r}")
        return value


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


@attrs.frozen
class Size(Kind):
    """Bytes: ``65536``, ``64KiB``, ``1MiB``."""

    min: int = 1
    max: int | None = None

    @property
    def expected(self) -> str:  # type: ignore[override]
        hi = "" if self.max is None else f" and at most {self.max}"
        return f"a size in bytes (e.g. 65536, 64KiB, 1MiB) of at least {self.min}{hi}"

    def parse(self, raw: str, ctx: _Ctx) -> int:
        m = re.fullmatch(r"(\d+)\s*([KkMmGg]i[Bb]|[Bb])?", raw.strip())
        if not m:
            raise ValueError(f"got {raw!r}")
        value = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
        if value < self.min or (self.max is not None and value > self.max):
            raise ValueError(f"got {raw!r}")
        return value


_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}


@attrs.frozen
class Bool(Kind):
    expected: str = "yes or no"

    def parse(self, raw: str, ctx: _Ctx) -> bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"got {raw!r}")


@attrs.frozen
class Url(Kind):
    schemes: tuple[str, ...] = ("https", "http")

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "a URL with scheme " + " or ".join(self.schemes)

    def parse(self, raw: str, ctx: _Ctx) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in self.schemes or not parts.hostname:
            raise ValueError(f"got {raw!r}")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise ValueError(f"got {raw!r}") from e
        return raw.rstrip("/")


@attrs.frozen
class OptionalUrl(Url):
    """An https (or http) URL, or ``off`` for none (parsed as None); with
    ``allow_empty``, an empty value is none as well."""

    allow_empty: bool = False

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "an https:// URL, empty or off" if self.allow_empty else "an https:// URL, or off"

    def parse(self, raw: str, ctx: _Ctx) -> str | None:  # type: ignore[override]
        word = raw.strip().lower()
        if word == "off" or (self.allow_empty and not word):
            return None
        return super().parse(raw, ctx)


def check_file_mode(path: str, secret: bool) -> None:
    """Refuse files that others may write (or, for secrets, read).

    Raises ValueError with the reason.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if st.st_mode & 0o022:
        raise ValueError(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run chmod go-w {path}"
        )
    if secret and st.st_mode & 0o077:
        raise ValueError(
            f"{path} is a secret but readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}"
        )


@attrs.frozen
class FilePath(Kind):
    """A file path, resolved against the config's directory.

    ``must_exist``: the file must exist, be regular, readable and not writable
    by group or others; ``secret``: also not readable by group or others.
    """

    must_exist: bool = True
    secret: bool = False

    @property
    def expected(self) -> str:  # type: ignore[override]
        if self.secret:
            return "a readable private file (mode 0600)"
        return "a readable file not writable by others" if self.must_exist else "a file path"

    def parse(self, raw: str, ctx: _Ctx) -> str:
        if not raw:
            raise ValueError("empty")
        path = os.path.normpath(os.path.join(ctx.base_dir, os.path.expanduser(raw)))
        if self.must_exist:
            if not os.path.exists(path):
                raise ValueError(f"{path} does not exist")
            check_file_mode(path, self.secret)
            if not os.access(path, os.R_OK):
                raise ValueError(f"{path} is not readable")
        else:
            parent = os.path.dirname(path) or "."
            if not os.path.isdir(parent):
                raise ValueError(f"directory {parent} does not exist")
        return path


@attrs.frozen
class DirPath(Kind):
    """A directory, resolved against the config's directory; created 0700 if
    ``create`` and missing; must not be writable by group or others."""

    create: bool = True
    expected: str = "a directory not writable by others"

    def parse(self, raw: str, ctx: _Ctx) -> str:
        if not raw:
            raise ValueError("empty")
        path = os.path.normpath(os.path.join(ctx.base_dir, os.path.expanduser(raw)))
        if not os.path.isdir(path):
            if not self.create:
                raise ValueError(f"{path} does not exist")
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot create {path}: {e.strerror}") from e
        st = os.stat(path)
        if st.st_mode & 0o022:
            raise ValueError(f"{path} is writable by group or others; run chmod go-w {path}")
        return path


@attrs.frozen
class OptionalDir(Kind):
    """An existing directory (resolved against the config's directory), or
    empty for none."""

    expected: str = "an existing directory not writable by others, or nothing"

    def parse(self, raw: str, ctx: _Ctx) -> str | None:
        return DirPath(create=False).parse(raw, ctx) if raw else None


class _ParseReactor:
    """What the endpoint parsers, and the ``listen()`` of a TCP or TLS server
    endpoint, call on a reactor: the ports a server would bind are recorded,
    nothing is opened, bound or resolved."""

    #: HostnameEndpoint (``tls:`` clients) stores the reactor's name resolver
    nameResolver = None

    def __init__(self) -> None:
        self.ports: list[int] = []

    def listenTCP(self, port: int, factory: object, backlog: int = 50,
                  interface: str = "") -> None:
        self.ports.append(port)

    def listenSSL(self, port: int, factory: object, contextFactory: object,
                  backlog: int = 50, interface: str = "") -> None:
        self.ports.append(port)


def _endpoint_check(kind: str, raw: str) -> str:
    # Twisted's parser validates the whole string (including the TLS key and
    # certificate files of ssl:) without opening any socket.  A TCP or TLS
    # server endpoint is also "listened" on a _ParseReactor, which records
    # the port number the real reactor would bind: a port out of range would
    # otherwise surface only at start-up, as a traceback from bind().  Other
    # server endpoints are not listened on: a systemd: endpoint's listen()
    # would close the inherited socket.
    from twisted.internet import endpoints
    from twisted.internet.interfaces import IReactorPluggableNameResolver
    from twisted.internet.protocol import Factory
    from zope.interface import alsoProvides

    reactor = _ParseReactor()
    # without it HostnameEndpoint warns that the reactor is deprecated
    alsoProvides(reactor, IReactorPluggableNameResolver)
    try:
        if kind == "server":
            endpoint = endpoints.serverFromString(reactor, raw)
            if isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint,
                                     endpoints.SSL4ServerEndpoint)):
                endpoint.listen(Factory())
        else:
            endpoints.clientFromString(reactor, raw)
    except Exception as e:  # endpoint parsers raise many types
        raise ValueError(f"got {raw!r} ({e})") from e
    for port in reactor.ports:
        if not 0 <= port <= 65535:
            raise ValueError(f"got {raw!r} (port {port} is not in 0..65535)")
    return raw


def _check_endpoint_files(raw: str, server: bool) -> None:
    """The TLS private key of an endpoint (``privateKey=``, and ``certKey=``
    when that file holds a key too) is a secret: refused when group or
    others may read it, like every other private key file."""
    args = _endpoint_paths(raw)
    if server and raw.split(":", 1)[0] == "ssl" and "privateKey" not in args:
        # Twisted would read server.pem from the daemon's working directory
        raise ValueError(f"got {raw!r} (an ssl: endpoint needs privateKey=FILE)")
    for name, path in args.items():
        if name not in ("privateKey", "certKey") or not os.path.exists(path):
            continue  # a missing file is reported by the endpoint parser
        secret = name == "privateKey" or _holds_private_key(path)
        try:
            check_file_mode(path, secret=secret)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def _holds_private_key(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"PRIVATE KEY-----" in f.read(1024 * 1024)
    except OSError:
        return False  # the endpoint parser reports it


class _Endpoint(Kind):
    """An endpoint string of one side (``server`` or ``client``): key file
    paths resolved against the config's directory, checked, then parsed."""

    side: ClassVar[str]

    def parse(self, raw: str, ctx: _Ctx) -> str:
        if not raw:
            raise ValueError("empty")
        resolved = _resolve_endpoint_paths(raw, ctx)
        _check_endpoint_files(resolved, server=self.side == "server")
        return _endpoint_check(self.side, resolved) if ctx.parse_endpoints else resolved


@attrs.frozen
class ServerEndpoint(_Endpoint):
    """A Twisted server endpoint string, e.g. ``ssl:8443:interface=127.0.0.1:...``.

    Relative ``privateKey=``/``certKey=``/``extraCertChain=``/``dhParameters=``
    paths are resolved against the config file's directory.  The port must
    be in 0..65535; an ``ssl:`` endpoint needs ``privateKey=``, a file that
    group and others can neither read nor write.
    """

    side: ClassVar[str] = "server"
    expected: str = "a server endpoint string such as tcp:8080:interface=127.0.0.1"


@attrs.frozen
class ClientEndpoint(_Endpoint):
    side: ClassVar[str] = "client"
    expected: str = "a client endpoint string such as tcp:host=127.0.0.1:port=22"


_PATH_ARGS = ("privateKey", "certKey", "extraCertChain", "dhParameters", "caCertsDir",
              "certificate", "trustRoots")


_PATH_ARG = re.compile(r"(?<![\w])(" + "|".join(_PATH_ARGS) + r")=((?:\\:|[^:])*)")


def _resolve_endpoint_paths(raw: str, ctx: _Ctx) -> str:
    def fix(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if value and not os.path.isabs(value):
            value = os.path.normpath(os.path.join(ctx.base_dir, value))
        return f"{name}={value}"

    return _PATH_ARG.sub(fix, raw)


def _endpoint_paths(raw: str) -> dict[str, str]:
    """``{argument: path}`` of the file arguments of an endpoint string
    (``\\:`` unescaped)."""
    return {m.group(1): m.group(2).replace("\\:", ":") for m in _PATH_ARG.finditer(raw)}


@attrs.frozen
class Key:
    """One key of a section: its kind, default (or REQUIRED) and documentation."""

    kind: Kind
    default: Any = REQUIRED
    doc: str = ""


@attrs.frozen
class Schema:
    """``{section: {key: Key}}``; ``optional_sections`` may be absent entirely
    (their keys then take their defaults, which must exist)."""

    sections: Mapping[str, Mapping[str, Key]]
    optional_sections: frozenset[str] = frozenset()
    validate: Callable[[Config], None] | None = None


class Section(Mapping[str, Any]):
    """Immutable mapping with attribute access: ``cfg.rest.listen``."""

    def __init__(self, name: str, values: dict[str, Any]):
        self._name = name
        self._values = MappingProxyType(dict(values))

    def __getattr__(self, item: str) -> Any:
        try:
            return self._values[item]
        except KeyError:
            raise AttributeError(f"[{self._name}] has no key {item}") from None

    def __getitem__(self, item: str) -> Any:
        return self._values[item]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") and "_values" not in self.__dict__:
            object.__setattr__(self, name, value)
            return
        raise AttributeError("config is immutable")

    def __repr__(self) -> str:
        return f"Section({self._name!r}, {dict(self._values)!r})"


class Config(Mapping[str, Section]):
    """A loaded config: ``cfg.path`` is the file, ``cfg.<section>.<key>`` the values."""

    def __init__(self, path: str, sections: dict[str, Section]):
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "_sections", MappingProxyType(dict(sections)))

    path: str

    def __getattr__(self, item: str) -> Section:
        try:
            return self._sections[item]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(f"no section [{item}]") from None

    def __getitem__(self, item: str) -> Section:
        return self._sections[item]  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sections)

    def __len__(self) -> int:
        return len(self._sections)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("config is immutable")

    def error(self, section: str, key: str | None, message: str) -> ConfigError:
        """A ConfigError for cross-key validation in ``Schema.validate``."""
        return ConfigError(self.path, section, key, message)


# --- typed sections ---------------------------------------------------------

_KEY = "ticrypt.config.key"
_GROUP = "ticrypt.config.group"
_SECTION = "ticrypt.config.section"

T = TypeVar("T")
R = TypeVar("R", bound="RoleConfig")


def setting(kind: Kind, default: T = REQUIRED, doc: str = "") -> T:
    """A field of a section class: one ini key of ``kind``.

    Without ``default`` the key is required.  A ``str`` default is read like
    ini text by the loader (so a relative path is resolved against the
    config's directory); any other default is the value itself."""
    key = Key(kind, default, doc)
    if default is REQUIRED:
        return attrs.field(metadata={_KEY: key})  # type: ignore[no-any-return]
    return attrs.field(default=default, metadata={_KEY: key})  # type: ignore[no-any-return]


def group(cls: type[T]) -> T:
    """A field of a section class holding a smaller settings class whose
    keys sit in the same ini section (its defaults are that class's)."""
    return attrs.field(factory=cls, metadata={_GROUP: cls})  # type: ignore[no-any-return]


def section(cls: type[T], optional: bool = False) -> T:
    """A field of a :class:`RoleConfig`: the ini section of the field's name.
    An ``optional`` section may be absent; its keys then take their defaults."""
    if optional:
        return attrs.field(factory=cls, metadata={_SECTION: cls})  # type: ignore[no-any-return]
    return attrs.field(metadata={_SECTION: cls})  # type: ignore[no-any-return]


# settings that mean the same in several roles: one kind, one default

def nft_table_setting(default: str, doc: str) -> str:
    """``nft_table``: the name of the role's own nftables table (the only
    one it writes), ``default`` being the role's."""
    return setting(Str(pattern=r"[a-z][a-z0-9_]{0,30}"), default, doc)


def nflog_group_setting(doc: str = "NFLOG group of denied egress, 0 = none") -> int:
    """``log_group``: the NFLOG group the role's firewall copies its drops to,
    read by :mod:`ticrypt.nft.denied`; 0 (the default) logs none."""
    return setting(Int(0, 65535), 0, doc)


@attrs.frozen(kw_only=True)
class RoleConfig:
    """Base of a role's typed config: ``path`` is the file it was read from.

    Cross-key checks go in :meth:`check`, raising :meth:`error`."""

    path: str = ""

    #: False for a tool that reads a role's file but neither listens nor
    #: connects (``ticrypt-admin`` reads rest.ini): its endpoint strings are
    #: resolved and their key files' modes checked, but they are not parsed
    #: by Twisted, which imports OpenSSL and loads the TLS key and
    #: certificate (a quarter of ticrypt-admin's CPU at each command).
    parse_endpoints: ClassVar[bool] = True

    def error(self, section: str, key: str | None, message: str) -> ConfigError:
        """A ConfigError naming this file, ``section`` and ``key``."""
        return ConfigError(self.path, section, key, message)

    def check(self) -> None:
        """Cross-key validation after loading; raise :meth:`error`."""


def _section_keys(cls: type) -> dict[str, Key]:
    keys: dict[str, Key] = {}
    for f in attrs.fields(cls):
        if _KEY in f.metadata:
            keys[f.name] = f.metadata[_KEY]
        elif _GROUP in f.metadata:
            inner = _section_keys(f.metadata[_GROUP])
            if twice := inner.keys() & keys.keys():
                raise TypeError(f"{cls.__name__}: keys declared twice: {sorted(twice)}")
            keys.update(inner)
    return keys


def _section_from(cls: type[T], values: Mapping[str, Any]) -> T:
    """A section class from parsed values ``{key: value}`` (groups included)."""
    kwargs: dict[str, Any] = {}
    for f in attrs.fields(cls):  # type: ignore[arg-type]
        if _KEY in f.metadata:
            kwargs[f.name] = values[f.name]
        elif _GROUP in f.metadata:
            kwargs[f.name] = _section_from(f.metadata[_GROUP], values)
    return cls(**kwargs)


def schema_of(spec: Schema | type[RoleConfig]) -> Schema:
    """The :class:`Schema` view of a typed config (sections, keys, kinds,
    defaults, docs), for the loader and the sample-documentation checks;
    a Schema is returned as it is."""
    if isinstance(spec, Schema):
        return spec
    sections: dict[str, Mapping[str, Key]] = {}
    optional: set[str] = set()
    for f in attrs.fields(spec):
        if _SECTION not in f.metadata:
            continue
        sections[f.name] = _section_keys(f.metadata[_SECTION])
        if f.default is not attrs.NOTHING:
            optional.add(f.name)
    return Schema(sections, frozenset(optional))


@overload
def load_config(path: str, schema: Schema) -> Config: ...
@overload
def load_config(path: str, schema: type[R]) -> R: ...


def load_config(path: str, schema: Schema | type[RoleConfig]) -> Config | RoleConfig:
    """Read and validate ``path`` against ``schema`` (a typed
    :class:`RoleConfig` class, or a :class:`Schema`); raise ConfigError."""
    typed = None if isinstance(schema, Schema) else schema
    schema = schema_of(schema)
    shown = path
    if not os.path.exists(path):
        raise ConfigError(shown, None, None, "config file does not exist")
    try:
        check_file_mode(path, secret=False)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except ValueError as e:
        raise ConfigError(shown, None, None, str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(shown, None, None, f"cannot read: {e}") from None
    if not text.strip():
        raise ConfigError(shown, None, None, "config file is empty")

    parser = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False,
        default_section="\x00no-default-section",
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=shown)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(shown, e.section, None, f"duplicate section (line {e.lineno})") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(shown, e.section, e.option, f"duplicate key (line {e.lineno})") from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(shown, None, None, f"line {e.lineno}: key outside any [section]") from None
    except configparser.Error as e:
        raise ConfigError(shown, None, None, f"not a valid ini file: {e.message}") from None

    ctx = _Ctx(base_dir=os.path.dirname(os.path.abspath(path)),
               parse_endpoints=typed is None or typed.parse_endpoints)
    for section in parser.sections():
        if section not in schema.sections:
            known = ", ".join(f"[{s}]" for s in schema.sections)
            raise ConfigError(shown, section, None, f"unknown section (expected {known})")

    out: dict[str, Section] = {}
    for section, keys in schema.sections.items():
        present = parser.has_section(section)
        if not present and section not in schema.optional_sections:
            first = next((k for k, v in keys.items() if v.default is REQUIRED), None)
            raise ConfigError(shown, section, first, "missing section")
        raw_items = dict(parser.items(section, raw=True)) if present else {}
        for key in raw_items:
            if key not in keys:
                raise ConfigError(shown, section, key, "unknown key")
        values: dict[str, Any] = {}
        for key, spec in keys.items():
            if key in raw_items:
                raw = raw_items[key].strip()
                try:
                    values[key] = spec.kind.parse(raw, ctx)
                except ValueError as e:
                    raise ConfigError(
                        shown, section, key, f"expected {spec.kind.expected}; {e}"
                    ) from None
            elif spec.default is REQUIRED:
                raise ConfigError(shown, section, key, f"missing; expected {spec.kind.expected}")
            elif isinstance(spec.default, str):
                values[key] = spec.kind.parse(spec.default, ctx)
            else:
                values[key] = spec.default
        out[section] = Section(section, values)
    if typed is not None:
        kwargs = {f.name: _section_from(f.metadata[_SECTION], out[f.name])
                  for f in attrs.fields(typed) if _SECTION in f.metadata}
        role = typed(path=os.path.abspath(path), **kwargs)
        role.check()
        return role
    config = Config(os.path.abspath(path), out)
    if schema.validate is not None:
        schema.validate(config)
    return config
