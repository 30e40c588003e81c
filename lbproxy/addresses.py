"""The one parser of ``HOST:PORT`` text (config, command line, registry entries).

Accepted: ``NAME:PORT`` where NAME is ASCII letters, digits, ``_``, ``.`` and ``-`` (a
hostname or an IPv4 literal), or ``[IPV6]:PORT`` (the brackets are required around an IPv6
literal and hold nothing else). PORT is ASCII digits, 0..65535; callers that need a real
port pass ``port_zero=False`` (a registered backend), where 0 means "any free port" in a
bind address. Hostnames are never resolved here.
"""

from __future__ import annotations

import ipaddress
import re

from lbproxy.config.types import Address

__all__ = ["parse_address"]

_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_address(text: str, *, port_zero: bool = True) -> Address:
    """Parse ``HOST:PORT`` or ``[IPv6]:PORT``; raise ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {text!r}") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"not HOST:PORT: {text!r}")
    low = 0 if port_zero else 1
    if not low <= int(port) <= 65535:
        raise ValueError(f"port must be {low}..65535: {text!r}")
    return Address(host, int(port))
