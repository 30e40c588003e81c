"""Checks shared by both head parsers: head location, line endings, framing, semantics.

Both parsers (h11 and the fast one) locate the head here, validate the syntax their own way,
then hand the parsed fields to :func:`build_request` / :func:`build_response`, so framing,
keep-alive and websocket decisions are made by exactly one piece of code.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from lbproxy.core.http1._types import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    BodyFraming,
    Headers,
    RequestHead,
    ResponseHead,
)
from lbproxy.errors import HttpError

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_INTERESTING = frozenset(
    (b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"host")
)
_VERSIONS = (b"1.1", b"1.0")
# RFC 9110 7.2 / RFC 3986 3.2.2-3: reg-name (IPv4 included) or [IP-literal], then :port digits
_REG_NAME = rb"(?:[-A-Za-z0-9._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*"
_IP_LITERAL = rb"\[(?:[0-9A-Fa-f:.]+|[vV][0-9A-Fa-f]+\.[-A-Za-z0-9._~!$&'()*+,;=:]+)\]"
HOST = rb"(?:" + _REG_NAME + rb"|" + _IP_LITERAL + rb")(?::[0-9]*)?"
_HOST = re.compile(HOST)
# the fast lanes: a non-empty reg-name starting with a plain character, and a port
# (possessive: no backtracking, no slower than the old "any value" match); IP literals and
# the rest are left to the parser
_REG_CHARS = rb"[-A-Za-z0-9._~!$&'()*+,;=]"
LANE_HOST = _REG_CHARS + rb"++(?:%[0-9A-Fa-f]{2}" + _REG_CHARS + rb"*+)*+(?::[0-9]*+)?"
_ABSOLUTE = re.compile(rb"[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^/?#@]*@)?([^/?#]*)")

TeClass = Literal["chunked", "malformed", "unsupported"]


def valid_host(value: bytes) -> bool:
    """Whether ``value`` is a valid Host field value / authority (RFC 9110 7.2): a reg-name or
    IPv4 address or [IPv6] literal with an optional :port; no userinfo, no spaces."""
    if _HOST.fullmatch(value) is None:
        return False
    if value.startswith(b"[") and value[1:2] not in (b"v", b"V"):
        literal = value[1 : value.index(b"]")].decode("ascii")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
    return True


def _check_host(target: bytes, headers: Headers) -> None:
    """400 for an invalid Host value, or an absolute-form target with an invalid authority."""
    for name, value in headers:
        if name == b"host" and not valid_host(value):
            raise HttpError(400, "invalid Host header")
    absolute = _ABSOLUTE.match(target)
    if absolute is not None and not valid_host(absolute.group(1)):
        raise HttpError(400, "invalid authority in the request target")


def locate_head(
    buf: bytes | bytearray, max_head: int, too_big: int, bad: int
) -> tuple[int, int] | None:
    """Find the head in ``buf``: ``(start, end)`` with ``buf[start:end]`` the head including the
    final blank line (leading blank lines, which RFC 9112 2.2 lets us skip, come before
    ``start``), or None when it is not complete yet. Raises HttpError(``too_big``) when the head
    is, or would become, longer than ``max_head``, and HttpError(``bad``) for bare CR/LF line
    endings. (Obs-fold lines are refused by each parser: their "name" is not a token.)"""
    start = 0
    if buf[:1] in (b"\r", b"\n"):
        start = _skip_blank_lines(buf, bad)
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        limit = len(buf) - 1 if buf[-1:] == b"\r" else len(buf)
        _check_line_endings(buf, start, limit, bad)
        if len(buf) > max_head:
            raise HttpError(too_big, f"no complete head within {max_head} bytes")
        return None
    end += 4
    if end > max_head:
        raise HttpError(too_big, f"head longer than {max_head} bytes")
    _check_line_endings(buf, start, end, bad)
    return start, end


def _skip_blank_lines(buf: bytes | bytearray, bad: int) -> int:
    blank = len(buf) - len(buf.lstrip(b"\r\n"))
    pairs = blank // 2
    if buf[: pairs * 2] != b"\r\n" * pairs:
        raise HttpError(bad, "bare CR or LF before the request line")
    if blank % 2 and (blank < len(buf) or buf[blank - 1 : blank] != b"\r"):
        raise HttpError(bad, "bare CR or LF before the request line")
    return pairs * 2


def _check_line_endings(buf: bytes | bytearray, start: int, end: int, bad: int) -> None:
    crlf = buf.count(b"\r\n", start, end)
    if buf.count(b"\n", start, end) != crlf or buf.count(b"\r", start, end) != crlf:
        raise HttpError(bad, "bare CR or LF in head (lines must end with CRLF)")


def classify_transfer_encoding(value: bytes) -> TeClass:
    """``chunked`` for exactly "chunked"; ``malformed`` for bad syntax or a misplaced/repeated
    chunked (or chunked with parameters); ``unsupported`` for any other valid coding list."""
    names: list[bytes] = []
    for coding in value.lower().split(b","):
        name, semicolon, _params = coding.strip(b" \t").partition(b";")
        name = name.rstrip(b" \t")
        if not _TOKEN.fullmatch(name) or (semicolon and name == b"chunked"):
            return "malformed"
        names.append(name)
    if names == [b"chunked"]:
        return "chunked"
    if b"chunked" in names and (names.count(b"chunked") > 1 or names[-1] != b"chunked"):
        return "malformed"
    return "unsupported"


def framing_from_headers(
    content_lengths: list[bytes], transfer_encodings: list[bytes], bad: int, unsupported: int
) -> BodyFraming:
    """The body framing the headers declare, rejecting every ambiguous (smuggling) shape."""
    if content_lengths and transfer_encodings:
        raise HttpError(bad, "both Content-Length and Transfer-Encoding")
    if len(transfer_encodings) > 1:
        raise HttpError(bad, "more than one Transfer-Encoding header")
    if transfer_encodings:
        verdict = classify_transfer_encoding(transfer_encodings[0])
        if verdict == "malformed":
            raise HttpError(bad, "malformed Transfer-Encoding")
        if verdict == "unsupported":
            raise HttpError(unsupported, "only Transfer-Encoding: chunked is supported")
        return CHUNKED
    if len(content_lengths) > 1:
        raise HttpError(bad, "more than one Content-Length header")
    if content_lengths:
        if not _DIGITS.fullmatch(content_lengths[0]):
            raise HttpError(bad, "invalid Content-Length")
        length = int(content_lengths[0])
        return BodyFraming("length", length) if length else NO_BODY
    return NO_BODY


def _comma_tokens(values: list[bytes]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        for token in value.lower().split(b","):
            token = token.strip(b" \t")
            if token:
                tokens.add(token)
    return tokens


class _Scan:
    """The few headers the decisions need, gathered in one pass (a local, per-call object)."""

    __slots__ = ("connection", "content_length", "hosts", "transfer_encoding", "upgrade")

    def __init__(self, headers: Headers) -> None:
        self.content_length: list[bytes] = []
        self.transfer_encoding: list[bytes] = []
        self.connection: list[bytes] = []
        self.upgrade: list[bytes] = []
        self.hosts = 0
        for name, value in headers:
            if name in _INTERESTING:
                if name == b"content-length":
                    self.content_length.append(value)
                elif name == b"transfer-encoding":
                    self.transfer_encoding.append(value)
                elif name == b"connection":
                    self.connection.append(value)
                elif name == b"upgrade":
                    self.upgrade.append(value)
                else:
                    self.hosts += 1


def _keep_alive(version: bytes, connection: set[bytes]) -> bool:
    if b"close" in connection:
        return False
    return version == b"1.1" or b"keep-alive" in connection


def _normalise_te(headers: Headers, lower_names: Headers) -> Headers:
    """Report the (validated, case-insensitive) chunked coding as b"chunked", as h11 does."""
    return tuple(
        (name, b"chunked") if low == b"transfer-encoding" else (name, value)
        for (low, _), (name, value) in zip(lower_names, headers, strict=True)
    )


def build_request(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: Headers,
    raw_headers: Headers,
    framing_headers: Headers,
) -> RequestHead:
    """Apply the request rules to syntactically valid fields. ``framing_headers`` holds every
    header line as received (lower-cased names), duplicates included."""
    scan = _Scan(framing_headers)
    body = framing_from_headers(scan.content_length, scan.transfer_encoding, 400, 501)
    if scan.hosts > 1:
        raise HttpError(400, "more than one Host header")
    if scan.hosts == 0 and version == b"1.1":
        raise HttpError(400, "missing Host header")
    if version not in _VERSIONS:
        raise HttpError(505, f"HTTP version {version.decode('ascii')} not supported")
    _check_host(target, headers)
    if body is CHUNKED:
        if version == b"1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        headers, raw_headers = _normalise_te(headers, headers), _normalise_te(raw_headers, headers)
    connection = _comma_tokens(scan.connection)
    websocket = (
        method == b"GET"
        and version == b"1.1"
        and b"upgrade" in connection
        and b"websocket" in _comma_tokens(scan.upgrade)
    )
    return RequestHead(
        method=method,
        target=target,
        version=version,
        headers=headers,
        raw_headers=raw_headers,
        keep_alive=_keep_alive(version, connection),
        websocket=websocket,
        body=body,
    )


def build_response(
    status: int,
    reason: bytes,
    version: bytes,
    headers: Headers,
    framing_headers: Headers,
    request_method: bytes,
) -> ResponseHead:
    """Apply the response rules (RFC 9112 6.3) to syntactically valid fields; 502 on errors."""
    if version not in _VERSIONS:
        raise HttpError(502, f"backend answered with HTTP version {version.decode('ascii')}")
    if status < 100:
        raise HttpError(502, f"backend answered with status {status}")
    scan = _Scan(framing_headers)
    declared = framing_from_headers(scan.content_length, scan.transfer_encoding, 502, 502)
    if declared is CHUNKED:
        if version == b"1.0":
            raise HttpError(502, "Transfer-Encoding in an HTTP/1.0 response")
        headers = _normalise_te(headers, headers)
    keep_alive = _keep_alive(version, _comma_tokens(scan.connection))
    tunnel = status == 101 or (request_method == b"CONNECT" and 200 <= status < 300)
    if tunnel:
        body, keep_alive = NO_BODY, False
    elif request_method == b"HEAD" or status < 200 or status in (204, 304):
        body = NO_BODY
    elif scan.content_length or scan.transfer_encoding:
        body = declared
    else:
        body, keep_alive = UNTIL_CLOSE, False
    return ResponseHead(
        status=status,
        reason=reason,
        version=version,
        headers=headers,
        keep_alive=keep_alive,
        body=body,
    )
