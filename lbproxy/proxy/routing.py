"""What a request is routed by and what the backend receives (pure: values in, values out).

The affinity key (and the sticky cookie) of a request, whether the fast lanes may route
a pool, and the request head as the backend gets it (X-Forwarded-* added).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lbproxy.core.balance import extract_key
from lbproxy.core.http1 import BodyFraming, RequestHead, rewrite_request

if TYPE_CHECKING:
    from lbproxy.proxy.context import ListenerContext

# What a request taken by the fast lane amounts to (see http1.lanes.quick_request).
QUICK_LIMIT = 8192  # larger heads take the full path (and its limits)
QUICK_GET = RequestHead(b"GET", b"/", b"1.1", (), (), True, False, BodyFraming("none"))
QUICK_WEBSOCKET = RequestHead(b"GET", b"/", b"1.1", (), (), True, True, BodyFraming("none"))


def lane_key(ctx: ListenerContext, ip: str) -> tuple[bool, bytes | None]:
    """(whether the fast lanes may route this pool, the affinity key they use)."""
    if ctx.pool.config.balance != "hash":
        return True, None
    if ctx.key_spec().kind != "ip":
        return False, None  # cookie/header/query keys need the parsed headers
    return True, ip.encode()


def affinity_key(
    ctx: ListenerContext, ip: str, head: RequestHead
) -> tuple[bytes | None, tuple[bytes, bytes] | None]:
    """(the request's hash key, the sticky Set-Cookie header its response gets)."""
    config = ctx.pool.config
    if config.balance != "hash":
        return None, None
    spec = ctx.key_spec()
    key = extract_key(spec, ip, head.headers, head.target)
    set_cookie = None
    if spec.kind == "cookie" and config.sticky_cookie:
        value = ctx.pool.sticky_cookie(key)  # (signed: names the backend it picks now)
        if value is not None:
            set_cookie = (
                b"Set-Cookie",
                f"{spec.name}={value}; Path=/; HttpOnly; SameSite=Lax".encode(),
            )
            key = value.encode()
    return (key if key is not None else ip.encode()), set_cookie


def forwarded_suffix(ctx: ListenerContext, ip: str) -> bytes:
    """The X-Forwarded-* lines (and the final CRLF) fast-lane requests get."""
    return (
        f"X-Forwarded-For: {ip}\r\nX-Forwarded-Proto: {ctx.proto.decode()}\r\n"
        f"X-Forwarded-Port: {ctx.port}\r\n\r\n"
    ).encode()


def upstream_request(ctx: ListenerContext, ip: str, head: RequestHead) -> bytes:
    """A parsed request's head as the backend gets it (X-Forwarded-* added)."""
    http10 = head.version == b"1.0"
    out = rewrite_request(
        head,
        client_ip=ip,
        proto=ctx.proto,
        port=ctx.port,
        keep_xff=ctx.is_trusted(ip),
        upstream_keep_alive=not http10,
    )
    if http10:
        # An HTTP/1.0 client cannot read a chunked response: ask the backend in 1.0
        # too (it then answers with Content-Length or until close).
        out = out.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    return out
