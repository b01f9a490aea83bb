"""One deployment on disk: the private CA, keys, secrets and every role's
config, written in one folder by one builder.

``ticrypt-lab``, the integration-test fixtures (``test/*fixture.py``), the
benchmarks and the network-namespace system tests all build their daemons'
files here, so a new config key is added once (and ``etc/<role>.ini``
documents it; ``test/test_deploy.py`` keeps the three in step)::

    dep = Deployment(folder, Addresses())        # 127.0.0.1, ports picked later
    dep.ca(); dep.feed_secret(); dep.backend()
    key = dep.user_key("alice")
    await dep.init(run, "alice")                 # ticrypt-admin init
    proxy, rest = await dep.start_backend(start) # the start order lives here
    vm_id, token = await dep.add_vm(run, "alice")
    await start("ticrypt-vmc", dep.vmc_ini(token))

``run`` runs a console script (:func:`ticrypt.lab.daemons.runner`, or the
lab's printing runner); ``start`` starts a twistd plugin and waits for its
readiness line (:func:`ticrypt.lab.daemons.spawn`, or a test's wrapper that
stops it in cleanup).  Every file goes through
:func:`ticrypt.fsutil.atomic_write`: secrets and private keys 0600, the rest
0644.  Paths inside the configs are relative to the folder (the config
loader resolves them against the config file's directory), so a lab folder
reads like the samples in ``etc/``.

A new role adds one ``<role>_ini`` method (and its files' names in
``__init__``); other addresses (one network namespace per role) are another
:class:`Addresses`, not another writer.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticrypt import identity, signed, tlsutil
from ticrypt.encoding import b64
from ticrypt.fsutil import atomic_write
from ticrypt.lab.daemons import Daemon

#: Runs a console script (argv[0] is its name) to completion: (code, out, err).
Run = Callable[[list[str]], Awaitable[tuple[int, str, str]]]
#: Starts twistd plugin ``name`` with config ``path`` and waits until it is ready.
Start = Callable[[str, str], Awaitable[Daemon]]
#: ``key = value`` lines of one section; a value of None leaves the key out
#: (the role's default applies).
Settings = Mapping[str, str | None]

#: The roles in the order they start.  The proxy first: rest hands clients
#: the proxy's URL, so the proxy's port must be known before rest starts;
#: the proxy polls rest's revocation feed and retries until rest answers.
#: Then rest.  Then each VM's vmc, once rest has registered the VM: it
#: enrolls with rest and opens its websockets to the proxy.
START_ORDER = ("ticrypt-proxy", "ticrypt-rest", "ticrypt-vmc")


class DeployError(Exception):
    """A deployment step failed; ``str()`` is the line to show."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (a daemon binds it next)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _host(host: str) -> str:
    """``host`` as it stands in a URL."""
    return f"[{host}]" if ":" in host else host


@attrs.define
class Addresses:
    """Where each role listens and how the others reach it.  Port 0: not
    known yet (the kernel picks one at start, and :meth:`Deployment.start_backend`
    records it)."""

    rest_host: str = "127.0.0.1"
    rest_port: int = 0
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 0
    #: the proxy's control API (pathway leases), on the proxy host; 0: not
    #: started yet (rest.ini then leaves pathways off)
    control_port: int = 0
    #: the ports of the proxy's pathway leases
    lease_ports: str = "6000-6100"
    #: ``HOST:PORT`` registered for a VM (``ticrypt-admin vm add --host``)
    vm_host: str = "127.0.0.1:2201"
    #: rest's scheme: ``http`` only for a test's plain listener
    rest_scheme: str = "https"
    #: the user's ticrypt-connect API on 127.0.0.1; 0: not started yet
    connect_port: int = 0

    @property
    def rest_url(self) -> str:
        return f"{self.rest_scheme}://{_host(self.rest_host)}:{self.rest_port}"

    @property
    def proxy_url(self) -> str:
        return f"wss://{_host(self.proxy_host)}:{self.proxy_port}"

    @property
    def control_url(self) -> str | None:
        """The proxy's control API, once its port is known."""
        if not self.control_port:
            return None
        return f"https://{_host(self.proxy_host)}:{self.control_port}"

    def tls_names(self) -> tuple[str, ...]:
        """The names the one server certificate covers."""
        names = ["localhost", "127.0.0.1", "::1", self.rest_host, self.proxy_host]
        return tuple(dict.fromkeys(names))


#: ticket ids, unique in this process (the proxy refuses a reused one)
_ticket_ids = itertools.count(1)


@attrs.define
class Backend:
    """The backend's Ed25519 signing key and what it signs (VM credentials,
    connection tickets, the revocation feed), as rest would: tests and
    benchmarks talk to a proxy without a rest."""

    key: Ed25519PrivateKey = attrs.field(factory=identity.generate)
    #: where its public key was written (``backend.pub``), if anywhere
    pub_path: str = ""
    clock: Callable[[], float] = time.time

    @property
    def public(self) -> bytes:
        return identity.public_bytes(self.key)

    def write_public(self, path: str) -> str:
        """Write ``ed25519:...`` to ``path`` (0644), as ``ticrypt-admin init`` does."""
        identity.save_public(path, self.key, "ticrypt-backend")
        self.pub_path = os.path.abspath(path)
        return path

    def vm_credential(self, vm_id: str, vm_key: Ed25519PrivateKey,
                      now: float | None = None) -> str:
        return signed.make_vm_credential(self.key, vm=vm_id,
                                         vm_key=identity.public_bytes(vm_key),
                                         now=self.clock() if now is None else now)

    def ticket(self, vm_id: str, user: str = "alice", user_key: Ed25519PrivateKey | None = None,
               client: str = "127.0.0.1", ttl: int = 300, now: float | None = None,
               session: str | None = None) -> str:
        user_key = user_key or identity.generate()
        return signed.make_ticket(self.key, user=user, user_key=identity.public_bytes(user_key),
                                  vm=vm_id, client=client,
                                  now=self.clock() if now is None else now, ttl=ttl,
                                  ticket_id=f"t{next(_ticket_ids)}",
                                  session=session or b64(os.urandom(signed.SID_BYTES)))

    def revocations(self, serial: int, users: dict[str, int] | None = None,
                    sessions: list[str] | None = None, now: float | None = None) -> str:
        """A signed revocation feed (what rest serves at GET /v1/revocations)."""
        return signed.make_revocation_feed(self.key, serial=serial,
                                           now=self.clock() if now is None else now,
                                           users=users or {}, sessions=sessions or [])


def render_ini(sections: Mapping[str, Settings], comment: str = "") -> str:
    """The text of an ini file; keys whose value is None are left out."""
    lines = [f"# {comment}"] if comment else []
    for name, keys in sections.items():
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        lines += [f"{k} = {v}" for k, v in keys.items() if v is not None]
    return "\n".join(lines) + "\n"


class Deployment:
    """The files of one deployment in ``directory`` (created 0700).

    Each ``*_ini`` method writes its role's config from the addresses and
    the file names below, with ``overrides`` replacing or adding keys
    (None removes one); a role's overrides are kept, so a later call (a
    restart on the recorded port, say) writes them again.  Returns the path.
    """

    def __init__(self, directory: str, addresses: Addresses | None = None,
                 comment: str = "written by ticrypt.lab.deploy"):
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.addresses = addresses or Addresses()
        self.comment = comment
        self.overrides: dict[str, dict[str, str | None]] = {}
        # names relative to self.dir, as the configs write them
        self.names = {
            "ca": "tls/ca.pem", "ca_key": "tls/ca.key", "server_pem": "tls/server.pem",
            "feed_secret": "feed.secret", "backend_key": "backend.key",
            "backend_pub": "backend.pub",
            "rest": "rest.ini", "rest_db": "rest.db", "rest_audit": "rest-audit.log",
            "proxy": "proxy.ini", "proxy_audit": "proxy-audit.log",
            "proxy_ledger": "proxy-tickets.ledger", "proxy_leases": "proxy-leases.json",
        }
        # the files other code opens
        self.ca_file = self.path("ca")
        self.server_pem = self.path("server_pem")
        self.feed_secret_file = self.path("feed_secret")
        self.rest_config = self.path("rest")
        self.proxy_config = self.path("proxy")

    def path(self, name: str) -> str:
        """Absolute path of ``name`` (a key of :attr:`names`, or a file name)."""
        return os.path.join(self.dir, self.names.get(name, name))

    def write(self, name: str, data: str | bytes, mode: int = 0o644) -> str:
        """Write file ``name`` atomically with ``mode``; returns its path."""
        path = self.path(name)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        atomic_write(path, data.encode() if isinstance(data, str) else data, mode)
        return path

    def _ini(self, role: str, name: str, sections: dict[str, dict[str, str | None]],
             overrides: Mapping[str, Settings]) -> str:
        """Write ``sections`` to file ``name`` with the overrides of each
        section (this call's and the earlier ones') applied."""
        for section, over in overrides.items():
            kept = self.overrides.setdefault(f"{name} [{section}]", {})
            kept.update(over)
            sections[section].update(kept)
        return self.write(name, render_ini(sections, f"{self.comment}: {role} "
                                                     f"(see etc/{role}.ini for every key)"))

    # -- shared material -----------------------------------------------------------

    def ca(self) -> tuple[str, str]:
        """The private CA and one server certificate (key and chain in one
        PEM, as ``ssl:`` endpoints want) for every host in the addresses;
        made once.  Returns (CA file, server PEM)."""
        if not os.path.exists(self.server_pem):
            os.makedirs(os.path.dirname(self.ca_file), mode=0o700, exist_ok=True)
            tlsutil.make_ca(self.ca_file, self.path("ca_key"))
            tlsutil.make_server_cert(self.ca_file, self.path("ca_key"), self.server_pem,
                                     self.addresses.tls_names())
        return self.ca_file, self.server_pem

    def feed_secret(self) -> str:
        """The bearer secret of rest's revocation feed, which rest and the
        proxy share (64 hex digits, 0600); made once."""
        if not os.path.exists(self.feed_secret_file):
            self.write("feed_secret", os.urandom(32).hex() + "\n", 0o600)
        return self.feed_secret_file

    def allowlist_feed_secret(self) -> str:
        """The bearer secret of rest's allow-list feed, which rest and
        ticrypt-allowedlist share (``allowlist-feed.secret``, 64 hex digits,
        0600); made once.  Returns its name relative to the directory, as the
        configs write it."""
        name = "allowlist-feed.secret"
        if not os.path.exists(self.path(name)):
            self.write(name, os.urandom(32).hex() + "\n", 0o600)
        return name

    def backend(self) -> Backend:
        """The backend signing key (``backend.key``, 0600, made once; rest's
        ``signing_key``, which ``ticrypt-admin init`` then keeps) and its
        public half ``backend.pub``, which the proxy reads."""
        path = self.path("backend_key")
        if os.path.exists(path):
            key = identity.load_private(path)
        else:
            key = identity.generate()
            identity.save_private(path, key)
        backend = Backend(key)
        backend.write_public(self.path("backend_pub"))
        return backend

    def user_key(self, user: str) -> tuple[Ed25519PrivateKey, str]:
        """``user``'s Ed25519 key in ``USER.key`` (0600) and ``USER.key.pub``,
        the names ``ticrypt keygen`` uses; made once.  Returns the key and
        the public key file."""
        path = self.path(f"{user}.key")
        if os.path.exists(path):
            key = identity.load_private(path)
        else:
            key = identity.generate()
            identity.save_private(path, key)
            identity.save_public(path + ".pub", key, user)
        return key, path + ".pub"

    # -- configs, one method a role --------------------------------------------------

    def _tls_listen(self, host: str, port: int) -> str:
        """A TLS listener on ``host:port`` with the deployment's server certificate."""
        return tlsutil.server_endpoint(port, self.names["server_pem"], host)

    def _files(self, **keys: str) -> dict[str, str | None]:
        """Keys naming the deployment's files: ``key=NAME`` (a key of
        :attr:`names`) becomes ``key = names[NAME]``."""
        return {key: self.names[name] for key, name in keys.items()}

    def rest_ini(self, **overrides: str | None) -> str:
        """``rest.ini``: HTTPS on the rest address, the database and signing
        key ``ticrypt-admin init`` creates, the proxy URL given to clients."""
        a = self.addresses
        return self._ini("rest", "rest", {"rest": {
            "listen": self._tls_listen(a.rest_host, a.rest_port),
            **self._files(database="rest_db", signing_key="backend_key",
                          audit_log="rest_audit", revocation_feed_secret="feed_secret"),
            "proxy_url": a.proxy_url,
            "allowlist_feed_secret": self.allowlist_feed_secret(),
            "proxy_control_url": a.control_url,
            "proxy_control_ca_file": self.names["ca"] if a.control_url else None,
        }}, {"rest": overrides})

    def proxy_ini(self, limits: Settings | None = None, leases: Settings | None = None,
                  **overrides: str | None) -> str:
        """``proxy.ini``: wss on the proxy address, rest's feed polled with
        the shared secret, the control API (TLS, same certificate; off
        before :meth:`ca`) on the proxy address and pathway leases
        (userspace) there too; ``limits``
        go to ``[limits]``, ``leases`` to ``[leases]``."""
        a = self.addresses
        sections: dict[str, dict[str, str | None]] = {"proxy": {
            "listen": self._tls_listen(a.proxy_host, a.proxy_port),
            **self._files(backend_public_key="backend_pub", audit_log="proxy_audit",
                          ticket_ledger="proxy_ledger", ca_file="ca",
                          revocation_feed_secret="feed_secret"),
            "rest_url": a.rest_url,
        }, "limits": {}, "control": {
            # TLS only: off until the deployment has its certificate (ca())
            "listen": (self._tls_listen(a.proxy_host, a.control_port)
                       if os.path.exists(self.server_pem) else "off"),
        }, "leases": {
            "ports": a.lease_ports,
            "interface": a.proxy_host,
            "public_host": a.proxy_host,
            "journal": self.names["proxy_leases"],
        }}
        return self._ini("proxy", "proxy", sections, {"proxy": overrides,
                                                      "limits": limits or {},
                                                      "leases": leases or {}})

    def vmc_ini(self, token: str | None = None, name: str = "vmc",
                exec_settings: Settings | None = None, tunnel_settings: Settings | None = None,
                sftp_settings: Settings | None = None, **overrides: str | None) -> str:
        """``NAME.ini`` for one VM's controller, with its state in
        ``NAME-state``, its audit log ``NAME-audit.log`` and, if ``token`` is
        given, the enrollment token in ``NAME-enroll.token`` (0600);
        ``exec_settings`` go to ``[exec]``, ``tunnel_settings`` to
        ``[tunnel]`` and ``sftp_settings`` to ``[sftp]`` (both off unless
        given; see :meth:`vm_tunnel`)."""
        sections: dict[str, dict[str, str | None]] = {"vmc": {
            "rest_url": self.addresses.rest_url,
            "ca_file": self.names["ca"],
            "state_dir": f"{name}-state",
            "enrollment_token_file": None,
            "audit_log": f"{name}-audit.log",
        }, "exec": {}, "tunnel": {}, "sftp": {}}
        if token is not None:
            self.write(f"{name}-enroll.token", token + "\n", 0o600)
            sections["vmc"]["enrollment_token_file"] = f"{name}-enroll.token"
        return self._ini("vmc", f"{name}.ini", sections, {
            "vmc": overrides, "exec": exec_settings or {}, "tunnel": tunnel_settings or {},
            "sftp": sftp_settings or {}})

    def vm_tunnel(self, name: str = "vmc", ports: tuple[int, ...] = (), sftp: bool = True,
                  host: str = "127.0.0.1") -> tuple[dict[str, str | None], dict[str, str | None]]:
        """``(tunnel_settings, sftp_settings)`` for :meth:`vmc_ini`: the tunnel
        server on ``host``, port picked at start (the ``tunnel`` listener of
        vmc's readiness line), streams allowed to ``ports`` and, with
        ``sftp``, to the SFTP server on a free port of 127.0.0.1 serving the
        folder ``NAME-sftp`` (made 0700)."""
        tunnel: dict[str, str | None] = {
            "enabled": "yes", "listen": "tcp:0:interface=" + host.replace(":", "\\:")}
        sftp_settings: dict[str, str | None] = {}
        allowed = list(ports)
        if sftp:
            os.makedirs(self.path(f"{name}-sftp"), mode=0o700, exist_ok=True)
            port = free_port()
            allowed.append(port)
            sftp_settings = {"enabled": "yes", "port": str(port), "root": f"{name}-sftp"}
        tunnel["ports"] = ", ".join(str(p) for p in dict.fromkeys(allowed))
        return tunnel, sftp_settings

    def vmhost_ini(self, vms: Mapping[int, str], name: str = "vmhost",
                   **overrides: str | None) -> str:
        """``NAME.ini`` for ticrypt-vmhost (userspace mode, listening on
        127.0.0.1): ``vms`` maps VM number N to ``ADDRESS[:PORT]`` (in the
        lab a vmc tunnel listener), reached on port ``base + N``; audit log
        ``NAME-audit.log``."""
        return self._ini("vmhost", f"{name}.ini", {"vmhost": {
            "mode": "userspace",
            "listen_host": "127.0.0.1",
            "vms": ", ".join(f"{n}={target}" for n, target in sorted(vms.items())),
            "audit_log": f"{name}-audit.log",
        }}, {"vmhost": overrides})

    def allowedlist_ini(self, upstream: str, name: str = "allowedlist",
                        **overrides: str | None) -> str:
        """``NAME.ini`` for ticrypt-allowedlist: DNS on 127.0.0.1 (any
        port, UDP and TCP), VMs 127.0.0.1/32, forwarding pool 10.77.9.0/24,
        ``upstream`` (``ADDRESS[:PORT]``) for the license servers' real
        addresses, rest's allow-list feed with :meth:`allowlist_feed_secret`,
        state in ``NAME-state``, audit log ``NAME-audit.log``, mode = off
        (DNS only; override ``mode``, ``dns_listen``, ``vm_networks``... for
        a namespace setup)."""
        a = self.addresses
        return self._ini("allowedlist", f"{name}.ini", {"allowedlist": {
            "dns_listen": "127.0.0.1:0",
            "vm_networks": "127.0.0.1/32",
            "forward_addresses": "10.77.9.0/24",
            "upstream": upstream,
            "rest_url": a.rest_url,
            "allow_plain": "yes" if a.rest_scheme == "http" else "no",
            "ca_file": self.names["ca"] if a.rest_scheme == "https" else None,
            "allowlist_feed_secret": self.allowlist_feed_secret(),
            "poll_interval": "0.5s",
            "state_dir": f"{name}-state",
            "audit_log": f"{name}-audit.log",
            "mode": "off",
        }}, {"allowedlist": overrides})

    def connect_ini(self, name: str = "connect", tunnels: Settings | None = None,
                    page: Settings | None = None, **overrides: str | None) -> str:
        """``NAME.ini`` for the user's ticrypt-connect: its API on
        127.0.0.1 (port :attr:`Addresses.connect_port`, 0: any), keys and
        token in ``NAME-state``, audit log ``NAME-audit.log``; ``tunnels``
        go to ``[tunnels]``, ``page`` to ``[page]``, which serves the
        browser page against this deployment's rest once its port is known
        and the CA made (else the page is off)."""
        a = self.addresses
        on = a.rest_port and os.path.exists(self.ca_file)
        return self._ini("connect", f"{name}.ini", {"connect": {
            "listen": f"tcp:{a.connect_port}:interface=127.0.0.1",
            "state_dir": f"{name}-state",
            "token_file": f"{name}-state/api.token",
            "audit_log": f"{name}-audit.log",
        }, "tunnels": {}, "page": {
            "rest_url": a.rest_url if on else None,
            "ca_file": self.names["ca"] if on else None,
        }}, {"connect": overrides, "tunnels": tunnels or {}, "page": page or {}})

    def client_ini(self, user: str, name: str = "client", connect: str = "connect",
                   **overrides: str | None) -> str:
        """``NAME.ini``, the ``ticrypt`` CLI config of ``user`` (key
        ``USER.key``, session kept in ``NAME-state``), using the
        ticrypt-connect ``connect`` once its port is known."""
        port = self.addresses.connect_port
        # [connect] first: [client] ends the file, as before it had a section
        # (a test appends a key to [client])
        return self._ini("client", f"{name}.ini", {"connect": {
            "url": f"http://127.0.0.1:{port}" if port else None,
            "token_file": f"{connect}-state/api.token",
        }, "client": {
            "rest_url": self.addresses.rest_url,
            "ca_file": self.names["ca"],
            "key_file": f"{user}.key",
            "user": user,
            "state_dir": f"{name}-state",
        }}, {"client": overrides})

    # -- the backend's records (through ticrypt-admin) -------------------------------

    def admin_command(self, *args: str) -> list[str]:
        """``ticrypt-admin --config rest.ini ARGS`` (argv)."""
        return ["ticrypt-admin", "--config", self.rest_config, *args]

    async def _admin(self, run: Run, what: str, *args: str) -> str:
        code, out, err = await run(self.admin_command(*args))
        if code != 0:
            raise DeployError(f"ticrypt-admin {what} failed ({code}): {(err or out).strip()}")
        return out

    async def init(self, run: Run, superadmin: str, public_key: str | None = None) -> bytes:
        """``ticrypt-admin init``: the database with ``superadmin`` (public key
        file ``public_key``, by default the one :meth:`user_key` wrote) and
        the backend key; returns the backend public key."""
        public_key = public_key or self.path(f"{superadmin}.key.pub")
        await self._admin(run, "init", "init", "--superadmin", superadmin,
                          "--public-key", public_key)
        return identity.load_public_file(self.path("backend_pub"))

    async def add_user(self, run: Run, user: str, role: str = "user") -> Ed25519PrivateKey:
        """A new key for ``user`` (:meth:`user_key`) and ``ticrypt-admin user add``."""
        key, pub = self.user_key(user)
        await self._admin(run, f"user add {user}", "user", "add", user, "--public-key", pub,
                          "--role", role)
        return key

    async def add_vm(self, run: Run, owner: str, name: str = "vm1",
                     host: str | None = None) -> tuple[str, str]:
        """``ticrypt-admin vm add``: returns the VM id and its single-use
        enrollment token."""
        out = await self._admin(run, f"vm add {name}", "--json", "vm", "add", name,
                                "--owner", owner, "--host", host or self.addresses.vm_host)
        added = json.loads(out)
        return str(added["vm"]["id"]), str(added["enrollment_token"])

    # -- the start order -------------------------------------------------------------

    async def start_proxy(self, start: Start) -> Daemon:
        """Write proxy.ini, start the proxy and record its port."""
        proxy = await start("ticrypt-proxy", self.proxy_ini())
        self.addresses.proxy_port = proxy.address("proxy")[1]
        if "control" in (proxy.ready_info or {}).get("listening", {}):
            self.addresses.control_port = proxy.address("control")[1]
        return proxy

    async def start_rest(self, start: Start) -> Daemon:
        """Write rest.ini, start rest and record its port and scheme."""
        rest = await start("ticrypt-rest", self.rest_ini())
        listening = (rest.ready_info or {}).get("listening", {})
        self.addresses.rest_scheme = "https" if "https" in listening else "http"
        self.addresses.rest_port = rest.address(self.addresses.rest_scheme)[1]
        return rest

    async def start_connect(self, start: Start, name: str = "connect") -> Daemon:
        """Write NAME.ini, start the user's ticrypt-connect and record its
        API port (write client.ini again afterwards to point at it)."""
        connect = await start("ticrypt-connect", self.connect_ini(name))
        self.addresses.connect_port = connect.address("api")[1]
        return connect

    async def start_backend(self, start: Start) -> tuple[Daemon, Daemon]:
        """The proxy, then rest (:data:`START_ORDER`).  rest's port is chosen
        first (the proxy's rest_url names it); the proxy's is whatever it got."""
        self.ca()
        self.feed_secret()
        if not self.addresses.rest_port:
            self.addresses.rest_port = free_port(self.addresses.rest_host)
        proxy = await self.start_proxy(start)
        rest = await self.start_rest(start)
        return proxy, rest
