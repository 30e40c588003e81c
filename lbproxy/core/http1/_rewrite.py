"""Serialising heads: the request sent to a backend, extra response headers, error responses."""

from __future__ import annotations

import re
from collections.abc import Sequence
from http import HTTPStatus
from types import MappingProxyType

from lbproxy.core.http1._types import RequestHead

_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port")
_HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer")
_DROP_PLAIN = frozenset((*_FORWARDED, *_HOP_BY_HOP, b"upgrade"))
_DROP_WEBSOCKET = frozenset((*_FORWARDED, *_HOP_BY_HOP))
# "Connection: content-length" must not make us strip the framing (a smuggling trick).
_NEVER_HOP_BY_HOP = frozenset((b"host", b"content-length", b"transfer-encoding", b"upgrade"))
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"[^\x00\r\n]*")
_AUTHORITY = re.compile(rb"[a-zA-Z][a-zA-Z0-9+.-]*://([^/?#@]*@)?([^/?#]*)")
# what only a trusted proxy may tell the backend (removed from anyone else's requests)
_UNTRUSTED = frozenset((b"forwarded", b"x-real-ip"))
_MAX_DETAIL = 200

REASONS = MappingProxyType(
    {
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        408: "Request Timeout",
        413: "Content Too Large",
        431: "Request Header Fields Too Large",
        500: "Internal Server Error",
        501: "Not Implemented",
        502: "Bad Gateway",
        503: "Service Unavailable",
        504: "Gateway Timeout",
        505: "HTTP Version Not Supported",
    }
)


def _connection_named(values: list[bytes]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for value in values:
        named.update(token.strip(b" \t") for token in value.lower().split(b","))
    return frozenset(named) - _NEVER_HOP_BY_HOP


def _host_for_http10(head: RequestHead) -> list[bytes]:
    """HTTP/1.0 may omit Host, but the HTTP/1.1 request we send must carry one (RFC 9112 3.2)."""
    if head.header(b"host") is not None:
        return []
    return [b"Host: \r\n"]


def origin_form(target: bytes) -> tuple[bytes, bytes | None]:
    """(the target in origin form, its authority) for an absolute-form target (RFC 9112 3.2.2:
    the authority replaces Host); ``(target, None)`` for any other form."""
    match = _AUTHORITY.match(target)
    if match is None:
        return target, None
    rest = target[match.end() :]
    if not rest.startswith(b"/"):
        rest = b"/" + rest  # "http://a?q" -> "/?q"
    return rest, match.group(2)


def rewrite_request(
    head: RequestHead,
    *,
    client_ip: str,
    proto: bytes,
    port: int,
    keep_xff: bool,
    upstream_keep_alive: bool,
) -> bytes:
    """The request head to send to the backend, always as HTTP/1.1, headers in original case.

    X-Forwarded-For is ``client_ip``, or "<incoming values>, client_ip" when ``keep_xff`` (the
    client is a trusted proxy) and it sent one; incoming X-Forwarded-Proto/-Port are replaced by
    ``proto`` and ``port``. Hop-by-hop headers (Connection and the headers it names, Keep-Alive,
    Proxy-Connection, TE, Trailer, Upgrade) are removed; Connection can never name Host,
    Content-Length or Transfer-Encoding away. "Connection: close" is added when not
    ``upstream_keep_alive``. A websocket request keeps Upgrade and gets "Connection: Upgrade".
    An absolute-form target is sent in origin form with Host set to its authority (any Host
    header is replaced, RFC 9112 3.2.2); an HTTP/1.0 request without Host gets an empty one.
    Forwarded and X-Real-IP are kept only when ``keep_xff`` (a trusted peer).
    """
    drop = _DROP_WEBSOCKET if head.websocket else _DROP_PLAIN
    connection = [value for name, value in head.headers if name == b"connection"]
    if connection:
        drop = drop | _connection_named(connection)
    if not keep_xff:
        drop = drop | _UNTRUSTED
    target, authority = origin_form(head.target)
    out = [head.method, b" ", target, b" HTTP/1.1\r\n"]
    if authority is not None:
        drop = drop | {b"host"}
        out += (b"Host: ", authority, b"\r\n")
    forwarded_for: list[bytes] = []
    for (name, _), (raw_name, value) in zip(head.headers, head.raw_headers, strict=True):
        if name in drop:
            if name == b"x-forwarded-for":
                forwarded_for.append(value)
            continue
        out += (raw_name, b": ", value, b"\r\n")
    if head.version == b"1.0" and authority is None:
        out += _host_for_http10(head)
    ip = client_ip.encode("ascii")
    if keep_xff and forwarded_for:
        forwarded_for.append(ip)
        ip = b", ".join(forwarded_for)
    out += (b"X-Forwarded-For: ", ip, b"\r\nX-Forwarded-Proto: ", proto)
    out += (b"\r\nX-Forwarded-Port: ", b"%d" % port, b"\r\n")
    if head.websocket:
        out.append(b"Connection: Upgrade\r\n")
    elif not upstream_keep_alive:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _header_lines(extra: Sequence[tuple[bytes, bytes]]) -> bytes:
    lines = []
    for name, value in extra:
        if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"invalid header {name!r}: {value!r}")
        lines.append(b"%s: %s\r\n" % (name, value))
    return b"".join(lines)


def add_response_headers(raw_head: bytes, extra: Sequence[tuple[bytes, bytes]]) -> bytes:
    """``raw_head`` (a complete head ending with the blank line) with ``extra`` header lines
    inserted before the final CRLF. Raises ValueError for a header with CR, LF or NUL."""
    if not raw_head.endswith(b"\r\n\r\n"):
        raise ValueError("raw_head must end with the blank line (CRLF CRLF)")
    if not extra:
        return bytes(raw_head)
    return b"".join((raw_head[:-2], _header_lines(extra), b"\r\n"))


def reason_phrase(status: int) -> str:
    """The standard reason phrase of ``status`` ("Error" when it has none)."""
    known = REASONS.get(status)
    if known is not None:
        return known
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_response(
    status: int, *, detail: str = "", extra_headers: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """A complete HTTP/1.1 error response (4xx/5xx) that closes the connection."""
    if not 400 <= status <= 599:
        raise ValueError(f"error_response needs a 4xx or 5xx status, not {status}")
    reason = reason_phrase(status)
    text = f"{status} {reason}"
    if detail:
        clean = "".join(ch if " " <= ch <= "~" else "?" for ch in detail[:_MAX_DETAIL])
        text += f": {clean}"
    body = (text + "\n").encode("ascii")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
    ).encode("ascii")
    return b"".join((head, _header_lines(extra_headers), b"\r\n", body))


_RESPONSE_HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer")
)


def rewrite_response(
    raw_head: bytes,
    *,
    close: bool,
    extra: Sequence[tuple[bytes, bytes]] = (),
    keep_alive: bool = False,
) -> bytes:
    """The backend's response head as the client gets it (not used for a 101).

    The backend's hop-by-hop headers (Connection, the headers it names, Keep-Alive, ...)
    describe the backend connection, not the client's, so they are dropped; ``close``
    adds ``Connection: close`` (lbproxy closes the client connection after this response),
    ``keep_alive`` (an HTTP/1.0 client whose connection stays open) ``Connection: keep-alive``;
    ``extra`` lines (e.g. Set-Cookie) are added. Upgrade is dropped too unless 101.
    """
    if not raw_head.endswith(b"\r\n\r\n"):
        raise ValueError("raw_head must end with the blank line (CRLF CRLF)")
    lines = raw_head[:-4].split(b"\r\n")
    named: set[bytes] = set()
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"connection":
            named.update(t.strip(b" \t").lower() for t in value.split(b","))
    drop = (_RESPONSE_HOP_BY_HOP | {b"upgrade"} | named) - _NEVER_HOP_BY_HOP
    kept = [lines[0]]
    kept += [line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in drop]
    out = b"\r\n".join(kept) + b"\r\n"
    if extra:
        out += _header_lines(extra)
    if close:
        out += b"Connection: close\r\n"
    elif keep_alive:
        out += b"Connection: keep-alive\r\n"
    return out + b"\r\n"
