"""Who may talk to the admin API (README "Admin API security"): the Host check against DNS
rebinding, and the rule that the admin API is never reached through a proxy. Pure functions.

DNS rebinding: a web page on ``evil.example`` makes its name resolve to 127.0.0.1, and
the browser then sends the page's requests to the admin API as same-origin requests
(it can read ``/api/pools`` and POST a drain), but with ``Host: evil.example``. So the
admin API answers only requests whose Host names it: the host of ``admin.listen`` (when
it is a specific address), ``localhost``, an IP address literal, or an ``[admin]
allowed_hosts`` entry. An IP literal cannot be rebound (rebinding needs a name the
attacker's DNS answers for; a page served from an IP literal *is* that address), and it is
what Prometheus scrapes and Kubernetes probes send (``Host: POD_IP:PORT``) with
``listen = "0.0.0.0:..."``, so every IP literal passes. The port in Host is not
compared: an attacker chooses the port of its own URL, so it proves nothing, and SSH
tunnels or container port mappings change it legitimately.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# RFC 3986 reg-name characters (percent-encoding included): anything else is not a host
_REG_NAME = re.compile(r"[a-z0-9\-._~!$&'()*+,;=%]+")
ALWAYS_ALLOWED = frozenset({"localhost"})
PROXY_HEADERS = ("forwarded", "x-forwarded-for")


def _canonical(host: str) -> str:
    """Lower case, no trailing dot, IP addresses in their compressed form."""
    host = host.lower()
    if host.endswith(".") and len(host) > 1:
        host = host[:-1]
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header value (``name``, ``name:port``, ``[v6]``, ``[v6]:port``) as
    (canonical host, port or None). ValueError when it is not one."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"unclosed bracket in {value!r}")
        host, rest = value[1:end], value[end + 1 :]
        ipaddress.IPv6Address(host)  # (ValueError when it is not an IPv6 address)
    else:
        host, colon, port_text = value.partition(":")
        rest = colon + port_text
        if ":" in port_text:
            raise ValueError(f"an IPv6 address must be in brackets: {value!r}")
        if not _REG_NAME.fullmatch(host.lower()):
            raise ValueError(f"not a host name: {value!r}")
    port: int | None = None
    if rest:
        digits = rest[1:]
        if not rest.startswith(":") or (digits and not (digits.isdigit() and len(digits) <= 5)):
            raise ValueError(f"bad port in {value!r}")
        port = int(digits) if digits else None
        if port is not None and port > 65535:
            raise ValueError(f"bad port in {value!r}")
    return _canonical(host), port


def allowed_host_entry(text: str) -> str:
    """One ``[admin] allowed_hosts`` entry, canonical; ValueError with the reason."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if ":" in bare:  # a bare IPv6 address (no port possible without brackets)
        try:
            return ipaddress.IPv6Address(bare).compressed
        except ValueError:
            raise ValueError(
                f"{text!r} is not a host name or IP address (without a port)"
            ) from None
    try:
        host, port = split_host(text)
    except ValueError:
        host, port = "", None
    if not host or port is not None or text.endswith(":"):
        raise ValueError(f"{text!r} is not a host name or IP address (without a port)")
    return host


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """The host names the admin API answers to (besides localhost and IP literals)."""

    names: frozenset[str]

    @classmethod
    def build(cls, listen_host: str, allowed_hosts: Iterable[str]) -> HostPolicy:
        names = {_canonical(h) for h in allowed_hosts}
        listen = _canonical(listen_host)
        try:
            unspecified = ipaddress.ip_address(listen).is_unspecified
        except ValueError:
            unspecified = listen == ""
        if not unspecified:  # (0.0.0.0 / [::]: the machine's names are not known)
            names.add(listen)
        return cls(frozenset(names))

    def allows(self, host_header: str) -> bool:
        try:
            host, _port = split_host(host_header)
        except ValueError:
            return False
        return host in ALWAYS_ALLOWED or host in self.names or _is_ip_literal(host)


def cross_origin(headers: Mapping[str, bytes]) -> bool:
    """A browser request made by a page of another origin (CSRF: a page anywhere can POST
    to ``http://127.0.0.1:9901/...`` without reading the answer; the Host check cannot see
    it, since its Host is the real one). Browsers send ``Origin`` on every cross-origin
    POST; the CLI and curl send none."""
    origin = headers.get("origin")
    if origin is None:
        return headers.get("sec-fetch-site", b"") == b"cross-site"
    host = headers.get("host", b"")
    _scheme, sep, rest = origin.partition(b"://")
    return not sep or rest.rstrip(b"/").lower() != host.lower()


def refusal(
    policy: HostPolicy, headers: Mapping[str, bytes], method: str = "GET"
) -> tuple[int, str] | None:
    """(status, message) when the request must be refused before routing, else None."""
    host = headers.get("host")
    if host is None:
        return 400, "a Host header is required"
    text = host.decode("latin-1")
    if not policy.allows(text):
        return 421, (
            f"misdirected request: Host {text[:100]!r} is not this admin API "
            "(list the names you use in [admin] allowed_hosts)"
        )
    for name in PROXY_HEADERS:
        if name in headers:
            return 403, f"refused: the admin API is not served through a proxy ({name} header)"
    if method not in ("GET", "HEAD") and cross_origin(headers):
        return 403, "refused: a change requested by a page of another origin"
    return None
