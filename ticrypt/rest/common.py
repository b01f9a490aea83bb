"""What rest's API shares with ``rest.ini``'s loader and ``ticrypt-admin``,
without the HTTP layer (:mod:`ticrypt.rest.api` loads ``twisted.web``): the
API's settings (keys of ``[rest]``), the ids of new VMs and allow-list
entries, and the checks of an allow-list entry's fields."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs

from ticrypt import dnsname
from ticrypt.config import Duration, Int, setting
from ticrypt.rest import store


@attrs.frozen(kw_only=True)
class ApiSettings:
    """Lifetimes and login limits of the API (keys of ``[rest]``)."""

    session_ttl: float = setting(Duration(min=1, max=30 * 86400), 8 * 3600.0,
                                 "session lifetime")
    challenge_ttl: float = setting(Duration(min=1, max=600), 60.0,
                                   "login challenge lifetime")
    ticket_ttl: float = setting(Duration(min=1, max=3600), 60.0,
                                "connection ticket lifetime")
    enrollment_ttl: float = setting(Duration(min=1, max=30 * 86400), 24 * 3600.0,
                                    "enrollment token lifetime")
    login_window: float = setting(Duration(min=1, max=86400), 300.0,
                                  "window of the login rate limits")
    login_failures_per_address: int = setting(Int(1, 100000), 20,
                                              "failed logins and enrollments per address")
    login_failures_per_user_and_address: int = setting(
        Int(1, 100000), 10, "failed logins for one user name from one address")
    challenges_per_address: int = setting(Int(1, 100000), 64,
                                          "outstanding challenges per address")


def new_vm_id(random: Callable[[int], bytes] = os.urandom) -> str:
    """``vm-`` and 16 lowercase hex digits."""
    return "vm-" + random(8).hex()


def new_allowlist_id(random: Callable[[int], bytes] = os.urandom) -> str:
    """``al-`` and 16 lowercase hex digits."""
    return "al-" + random(8).hex()


#: most ports of one allow-list entry
MAX_ALLOW_PORTS = 32
MAX_ALLOW_COMMENT = 200


def check_allow_name(value: str) -> str | None:
    try:
        dnsname.canonical_name(value)
    except ValueError as e:
        return f"is not an allow-list name: {e}"
    return None


def check_ports(value: list[Any]) -> str | None:
    if not 1 <= len(value) <= MAX_ALLOW_PORTS:
        return f"must list 1 to {MAX_ALLOW_PORTS} ports"
    for port in value:
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            return "must be integers 1..65535"
    if len(set(value)) != len(value):
        return "must not repeat a port"
    return None


def check_protocol(value: str) -> str | None:
    return None if value in ("tcp", "udp") else "must be 'tcp' or 'udp'"


def check_comment(value: str) -> str | None:
    if len(value) > MAX_ALLOW_COMMENT:
        return f"must be at most {MAX_ALLOW_COMMENT} characters"
    if not value.isprintable():
        return "must be printable (no control characters)"
    return None


def allow_entry(name: str, ports: list[Any], protocol: str = "tcp", comment: str = "",
                random: Callable[[int], bytes] = os.urandom) -> store.AllowEntry:
    """A new allow-list entry in canonical form (ValueError: one line why),
    for the API and ``ticrypt-admin``."""
    for field, problem in (("name", check_allow_name(name)), ("ports", check_ports(ports)),
                           ("protocol", check_protocol(protocol)),
                           ("comment", check_comment(comment))):
        if problem:
            raise ValueError(f"{field} {problem}")
    return store.AllowEntry(id=new_allowlist_id(random), name=dnsname.canonical_name(name),
                            ports=tuple(sorted(ports)), protocol=protocol, comment=comment)
