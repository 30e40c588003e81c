"""PROXY protocol v1/v2 headers (sans-IO), sent to the backend before any client byte."""

from __future__ import annotations

import ipaddress
import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _unmap(host: str) -> str:
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def proxy_header(version: str, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """The PROXY header announcing a TCP connection from ``src`` to ``dst``."""
    src_host, dst_host = _unmap(src[0]), _unmap(dst[0])
    v6 = ":" in src_host or ":" in dst_host
    if v6:  # mixed families: express the IPv4 side as an IPv4-mapped IPv6 address
        src_host = src_host if ":" in src_host else f"::ffff:{src_host}"
        dst_host = dst_host if ":" in dst_host else f"::ffff:{dst_host}"
    if version == "v1":
        family = "TCP6" if v6 else "TCP4"
        return f"PROXY {family} {src_host} {dst_host} {src[1]} {dst[1]}\r\n".encode()
    if version == "v2":
        af = socket.AF_INET6 if v6 else socket.AF_INET
        addresses = (
            socket.inet_pton(af, src_host)
            + socket.inet_pton(af, dst_host)
            + struct.pack("!HH", src[1], dst[1])
        )
        fam_byte = 0x21 if v6 else 0x11  # AF_INET6/AF_INET + STREAM
        return (
            V2_SIGNATURE + bytes((0x21, fam_byte)) + struct.pack("!H", len(addresses)) + addresses
        )
    raise ValueError(f"unknown PROXY protocol version {version!r}")
