"""The vmc's config (documented key by key in ``etc/vmc.ini``).

The pool's tunables are the pool's own classes: ``[vmc]`` gathers
:class:`~ticrypt.vmc.pool.LinkSettings`, ``[exec]``
:class:`~ticrypt.vmc.pool.SessionLimits`; each default is written once.
"""

from __future__ import annotations

import os

import attrs

from ticrypt.config import (
    Bool,
    DirPath,
    Duration,
    FilePath,
    Int,
    NetworkList,
    OptionalDir,
    Port,
    PortList,
    RoleConfig,
    ServerEndpoint,
    Str,
    Url,
    group,
    nflog_group_setting,
    section,
    setting,
)
from ticrypt.vmc.pins import PinLimits
from ticrypt.vmc.pool import LinkSettings, SessionLimits
from ticrypt.vmc.processes import RunAs

DEFAULT_SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"


@attrs.frozen(kw_only=True)
class VmcSection:
    """``[vmc]``: rest, state, audit and the pool's sockets."""

    rest_url: str = setting(Url(("https",)), doc="rest base URL")
    ca_file: str = setting(FilePath(), doc="CA that signs rest's and proxy's certificates")
    state_dir: str = setting(DirPath(), doc="keys, enrollment, owner pin, users")
    enrollment_token_file: str | None = setting(FilePath(must_exist=False), None,
                                                "single-use token file (0600)")
    audit_log: str = setting(FilePath(must_exist=False), doc="JSON-lines audit log")
    proxy_url: str = setting(Str(allow_empty=True), "", "override the enrolled proxy URL")
    request_timeout: float = setting(Duration(), 30.0, "enrollment request to rest")
    links: LinkSettings = group(LinkSettings)


@attrs.frozen(kw_only=True)
class ExecSection:
    """``[exec]``: what users run and how much of it."""

    shell: str = setting(FilePath(), DEFAULT_SHELL, "shell for the shell command")
    run_as: str = setting(Str(allow_empty=True), "", "user commands run as")
    limits: SessionLimits = group(SessionLimits)


@attrs.frozen(kw_only=True)
class ProcessesSection:
    """``[processes]``: where user processes are tracked."""

    cgroup: str = setting(Str(pattern=r"auto|off|/.*"), "auto",
                          "parent cgroup of user processes: auto, off or a path")


@attrs.frozen(kw_only=True)
class TunnelSection:
    """``[tunnel]``: the TLS tunnel server (PROTOCOL.md §5 tunnel-accept)."""

    enabled: bool = setting(Bool(), False, "run the tunnel server")
    listen: str = setting(ServerEndpoint(), "tcp:22", "plain TCP endpoint; vmc adds TLS")
    ports: tuple[int, ...] = setting(PortList(), (2022,), "ports streams may reach on 127.0.0.1")
    handshake_timeout: float = setting(Duration(), 10.0, "TLS handshake of a tunnel client")
    connect_timeout: float = setting(Duration(), 10.0, "a stream's connect to 127.0.0.1:P")
    max_connections: int = setting(Int(1, 10000), 64, "tunnel connections at once")
    pins: PinLimits = group(PinLimits)


@attrs.frozen(kw_only=True)
class SftpSection:
    """``[sftp]``: the SFTP-only server on 127.0.0.1."""

    enabled: bool = setting(Bool(), False, "run the SFTP server")
    port: int = setting(Port(), 2022, "listens on 127.0.0.1:port")
    root: str | None = setting(OptionalDir(), "", "folder SFTP users see as /")


@attrs.frozen(kw_only=True)
class FirewallSection:
    """``[firewall]``: the VM's own nftables rules (:mod:`ticrypt.vmc.firewall`)."""

    enabled: bool = setting(Bool(), False, "install table inet ticrypt_vmc")
    dns: str = setting(Str(allow_empty=True), "",
                       "the allowedlist DNS responder's address (UDP and TCP 53)")
    allow_out: tuple[str, ...] = setting(NetworkList(), (),
                                         "the allow-list forwarding addresses")
    backend: tuple[str, ...] = setting(NetworkList(), (),
                                       "rest's and the proxy's addresses, if URLs name hosts")
    log_group: int = nflog_group_setting()
    dhcp: bool = setting(Bool(), False, "allow DHCPv4 client traffic")


@attrs.frozen(kw_only=True)
class VmcConfig(RoleConfig):
    """``vmc.ini``."""

    vmc: VmcSection = section(VmcSection)
    exec: ExecSection = section(ExecSection, optional=True)
    processes: ProcessesSection = section(ProcessesSection, optional=True)
    tunnel: TunnelSection = section(TunnelSection, optional=True)
    sftp: SftpSection = section(SftpSection, optional=True)
    firewall: FirewallSection = section(FirewallSection, optional=True)

    def check(self) -> None:
        v, e = self.vmc, self.exec
        if v.links.backoff_initial > v.links.backoff_max:
            raise self.error("vmc", "backoff_initial", "must not exceed backoff_max")
        if v.proxy_url and not v.proxy_url.startswith("wss://"):
            raise self.error("vmc", "proxy_url", f"expected a wss:// URL; got {v.proxy_url!r}")
        if not os.access(e.shell, os.X_OK):
            raise self.error("exec", "shell", f"{e.shell} is not an executable file")
        try:
            RunAs.lookup(e.run_as or None, e.shell)
        except KeyError:
            raise self.error("exec", "run_as", f"no such user {e.run_as!r}") from None
        if self.tunnel.enabled and not self.tunnel.listen.startswith(("tcp:", "tcp6:")):
            raise self.error("tunnel", "listen", "expected a tcp: or tcp6: endpoint (vmc "
                             "adds TLS with its own certificate)")
        if self.sftp.enabled and self.sftp.root is None:
            raise self.error("sftp", "root", "missing; the folder SFTP users see as /")
        if self.firewall.enabled:
            from ticrypt.vmc.firewall import FirewallConfigError, vmc_table

            try:
                vmc_table(self)
            except FirewallConfigError as e:
                raise self.error(e.section, e.key, e.message) from None
