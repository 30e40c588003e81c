"""Pure tests of lbproxy.core.http1: every head test runs on both parsers ("fast" and "h11")."""

from __future__ import annotations

import itertools
from typing import cast

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.core.http1 import (
    MAX_HEAD,
    MAX_LINE,
    BodyFraming,
    ChunkedTracker,
    LengthTracker,
    Parser,
    RequestHead,
    ResponseHead,
    add_response_headers,
    error_response,
    parse_request_head,
    parse_response_head,
    rewrite_request,
)
from lbproxy.errors import HttpError

PARSERS: tuple[Parser, ...] = ("fast", "h11")

BROWSER_WS = (
    b"GET /chat?user=alice HTTP/1.1\r\n"
    b"Host: example.com:8080\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: */*\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Origin: http://example.com:8080\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Cookie: session=abcdef0123456789; theme=dark\r\n"
    b"Sec-Fetch-Mode: websocket\r\n"
    b"Pragma: no-cache\r\n"
    b"Upgrade: websocket\r\n"
    b"\r\n"
)


@pytest.fixture(params=PARSERS)
def parser(request: pytest.FixtureRequest) -> Parser:
    return cast(Parser, request.param)


def request(head: bytes, parser: Parser, max_head: int = MAX_HEAD) -> RequestHead:
    parsed = parse_request_head(head, max_head, parser=parser)
    assert parsed is not None
    assert parsed[1] == len(head)
    return parsed[0]


def request_status(head: bytes, parser: Parser, max_head: int = MAX_HEAD) -> int:
    with pytest.raises(HttpError) as info:
        parse_request_head(head, max_head, parser=parser)
    return info.value.status


def head_with(*lines: bytes, start: bytes = b"GET / HTTP/1.1") -> bytes:
    return b"\r\n".join((start, *lines)) + b"\r\n\r\n"


def response(head: bytes, parser: Parser, method: bytes = b"GET") -> ResponseHead:
    parsed = parse_response_head(head, method, parser=parser)
    assert parsed is not None
    assert parsed[1] == len(head)
    return parsed[0]


def response_status(head: bytes, parser: Parser, method: bytes = b"GET") -> int:
    with pytest.raises(HttpError) as info:
        parse_response_head(head, method, parser=parser)
    return info.value.status


# --- request heads ---------------------------------------------------------------------------


def test_browser_websocket_request(parser: Parser) -> None:
    head = request(BROWSER_WS, parser)
    assert (head.method, head.target, head.version) == (b"GET", b"/chat?user=alice", b"1.1")
    assert head.websocket and head.keep_alive
    assert head.body == BodyFraming("none")
    assert head.header(b"sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert head.header(b"x-missing") is None
    assert head.headers[0] == (b"host", b"example.com:8080")
    assert head.raw_headers[0] == (b"Host", b"example.com:8080")
    assert len(head.headers) == len(head.raw_headers) == 14


def test_values_are_stripped_and_order_kept(parser: Parser) -> None:
    head = request(head_with(b"Host: a", b"X-A:  one two \t", b"x-a:\ttwo", b"X-Empty:"), parser)
    assert head.headers == (
        (b"host", b"a"),
        (b"x-a", b"one two"),
        (b"x-a", b"two"),
        (b"x-empty", b""),
    )
    assert head.raw_headers[1:3] == ((b"X-A", b"one two"), (b"x-a", b"two"))
    assert head.header(b"x-a") == b"one two"


def test_bytes_after_the_head_are_not_consumed(parser: Parser) -> None:
    first = head_with(b"Host: a", b"Content-Length: 5")
    parsed = parse_request_head(bytearray(first + b"hello" + head_with(b"Host: b")), parser=parser)
    assert parsed is not None
    head, used = parsed
    assert used == len(first)
    assert head.body == BodyFraming("length", 5)


@pytest.mark.parametrize(
    "data",
    [
        BROWSER_WS,
        head_with(b"Host: a", b"Transfer-Encoding: chunked", start=b"POST /up HTTP/1.1"),
        b"\r\n\r\n" + head_with(b"Host: a"),
        head_with(start=b"GET http://example.com/x?y HTTP/1.0"),
    ],
)
def test_byte_by_byte_feeding_gives_the_same_result(data: bytes, parser: Parser) -> None:
    whole = parse_request_head(data + b"extra", parser=parser)
    for size in range(len(data)):
        assert parse_request_head(data[:size], parser=parser) is None
    assert parse_request_head(data, parser=parser) == whole
    assert whole is not None and whole[1] == len(data)


def test_leading_empty_lines_are_skipped_and_counted(parser: Parser) -> None:
    parsed = parse_request_head(b"\r\n\r\n" + head_with(b"Host: a"), parser=parser)
    assert parsed is not None and parsed[1] == 4 + len(head_with(b"Host: a"))
    assert parse_request_head(b"\r\n\r", parser=parser) is None
    assert request_status(b"\n" + head_with(b"Host: a"), parser) == 400
    assert request_status(b"\r\n\n", parser) == 400
    assert request_status(b"\rGET", parser) == 400
    assert request_status(b"\n\r" + head_with(b"Host: a"), parser) == 400


@pytest.mark.parametrize(
    ("lines", "start", "websocket"),
    [
        ((b"Host: a", b"Upgrade: websocket", b"Connection: Upgrade"), b"GET / HTTP/1.1", True),
        ((b"Host: a", b"Upgrade: WebSocket", b"Connection: keep-alive, UPGRADE"), None, True),
        ((b"Host: a", b"upgrade: websocket", b"connection: x", b"Connection: upgrade"), None, True),
        ((b"Host: a", b"Upgrade: websocket", b"Connection: Upgrade"), b"POST / HTTP/1.1", False),
        ((b"Host: a", b"Upgrade: websocket", b"Connection: keep-alive"), None, False),
        ((b"Host: a", b"Upgrade: h2c", b"Connection: Upgrade"), None, False),
        ((b"Host: a", b"Connection: Upgrade"), None, False),
        ((b"Upgrade: websocket", b"Connection: Upgrade"), b"GET / HTTP/1.0", False),
    ],
)
def test_websocket_detection(
    lines: tuple[bytes, ...], start: bytes | None, websocket: bool, parser: Parser
) -> None:
    head = request(head_with(*lines, start=start or b"GET / HTTP/1.1"), parser)
    assert head.websocket is websocket


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"1.1", None, True),
        (b"1.1", b"Connection: keep-alive", True),
        (b"1.1", b"Connection: close", False),
        (b"1.1", b"Connection: Upgrade, Close", False),
        (b"1.0", None, False),
        (b"1.0", b"Connection: Keep-Alive", True),
        (b"1.0", b"Connection: close", False),
        (b"1.0", b"Connection: keep-alive, close", False),
    ],
)
def test_keep_alive_rules(
    version: bytes, connection: bytes | None, keep_alive: bool, parser: Parser
) -> None:
    lines = (b"Host: a",) if connection is None else (b"Host: a", connection)
    head = request(head_with(*lines, start=b"GET / HTTP/" + version), parser)
    assert head.version == version
    assert head.keep_alive is keep_alive


@pytest.mark.parametrize(
    ("lines", "body"),
    [
        ((), BodyFraming("none")),
        ((b"Content-Length: 0",), BodyFraming("none")),
        ((b"Content-Length: 0012",), BodyFraming("length", 12)),
        ((b"Transfer-Encoding: chunked",), BodyFraming("chunked")),
        ((b"Transfer-Encoding: Chunked",), BodyFraming("chunked")),
    ],
)
def test_request_body_framing(lines: tuple[bytes, ...], body: BodyFraming, parser: Parser) -> None:
    head = request(head_with(b"Host: a", *lines, start=b"POST / HTTP/1.1"), parser)
    assert head.body == body
    if body.kind == "chunked":  # as h11 reports it, whatever the case received
        assert head.header(b"transfer-encoding") == b"chunked"
        assert head.raw_headers[-1] == (b"Transfer-Encoding", b"chunked")


def test_431_for_an_incomplete_head_over_the_limit(parser: Parser) -> None:
    filler = b"GET / HTTP/1.1\r\nHost: a\r\nX-Fill: " + b"a" * (MAX_HEAD - 40)
    assert parse_request_head(filler[:MAX_HEAD], parser=parser) is None
    assert len(filler) < MAX_HEAD
    assert parse_request_head(filler + b"a" * (MAX_HEAD - len(filler)), parser=parser) is None
    assert request_status(filler + b"a" * (MAX_HEAD + 1 - len(filler)), parser) == 431


def test_431_for_a_complete_head_over_the_limit(parser: Parser) -> None:
    exact = head_with(b"Host: a", b"X-Fill: " + b"a" * (MAX_HEAD - 42))
    exact = exact[:-4] + b"a" * (MAX_HEAD - len(exact)) + b"\r\n\r\n"
    assert len(exact) == MAX_HEAD
    assert request(exact, parser).header(b"x-fill") is not None
    assert request_status(exact[:-4] + b"a\r\n\r\n", parser) == 431
    assert request_status(head_with(b"Host: a", b"X: " + b"b" * 100), parser, max_head=64) == 431


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        ((b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400),
        ((b"Transfer-Encoding: chunked", b"Content-Length: 5"), 400),
        ((b"Content-Length: 5", b"Content-Length: 5"), 400),
        ((b"Content-Length: 5", b"Content-Length: 6"), 400),
        ((b"Content-Length: 5, 5",), 400),
        ((b"Content-Length: 5,6",), 400),
        ((b"Content-Length: -1",), 400),
        ((b"Content-Length: +5",), 400),
        ((b"Content-Length: 0x5",), 400),
        ((b"Content-Length: 5 5",), 400),
        ((b"Content-Length:",), 400),
        ((b"Content-Length: 1234567890123456789",), 400),
        ((b"Transfer-Encoding: chunked, chunked",), 400),
        ((b"Transfer-Encoding: chunked;q=1",), 400),
        ((b"Transfer-Encoding: chunked, gzip",), 400),
        ((b"Transfer-Encoding: chunked,",), 400),
        ((b"Transfer-Encoding:",), 400),
        ((b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), 400),
        ((b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"), 400),
        ((b'Transfer-Encoding: "chunked"',), 400),
        ((b"Transfer-Encoding: xchunked",), 501),
        ((b"Transfer-Encoding: gzip, chunked",), 501),
        ((b"Transfer-Encoding: identity",), 501),
        ((b"Transfer-Encoding: gzip",), 501),
        ((b"X-A: b", b" folded"), 400),
        ((b"X-A: b", b"\tfolded"), 400),
        ((b"Transfer-Encoding: chunked", b" , identity"), 400),
        ((b"Host : a",), 400),
        ((b"X-A\t: b",), 400),
        ((b"X-A: b\x00c",), 400),
        ((b"X-A: b\x0bc",), 400),
        ((b"X-A: b\x0cc",), 400),
        ((b"X-A: b\rc",), 400),
        ((b"X-A: b\nc",), 400),
        ((b"X(A): b",), 400),
        ((b"X\x80: b",), 400),
        ((b": b",), 400),
        ((b"no colon here",), 400),
        ((b"Host: b",), 400),
    ],
)
def test_smuggling_shapes_are_refused(
    lines: tuple[bytes, ...], status: int, parser: Parser
) -> None:
    assert request_status(head_with(b"Host: a", *lines, start=b"POST / HTTP/1.1"), parser) == status


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
        (b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
        (b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /\x80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1\r\nHost: a\r\n\r\n", 400),
        (b"GET /\r\nHost: a\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\n\r\n", 505),
    ],
)
def test_malformed_requests(data: bytes, status: int, parser: Parser) -> None:
    assert request_status(data, parser) == status


def test_bare_lf_is_refused_before_the_head_is_complete(parser: Parser) -> None:
    assert request_status(b"GET / HTTP/1.1\nHost: a\n", parser) == 400
    assert parse_request_head(b"GET / HTTP/1.1\r", parser=parser) is None


@pytest.mark.parametrize(
    "start",
    [b"GET http://example.com:81/p?q HTTP/1.1", b"OPTIONS * HTTP/1.1", b"PURGE /x HTTP/1.1"],
)
def test_other_request_forms_are_fine(start: bytes, parser: Parser) -> None:
    assert request(head_with(b"Host: a", start=start), parser).target == start.split(b" ")[1]


def test_http10_without_host_is_fine(parser: Parser) -> None:
    head = request(b"GET / HTTP/1.0\r\n\r\n", parser)
    assert head.headers == () and not head.keep_alive


def test_control_characters_h11_tolerates_are_kept(parser: Parser) -> None:
    head = request(head_with(b"Host: a", b"Cookie: a=\x01b\x7f\xff"), parser)
    assert head.header(b"cookie") == b"a=\x01b\x7f\xff"


def test_unknown_parser_is_refused() -> None:
    with pytest.raises(ValueError, match="parser"):
        parse_request_head(BROWSER_WS, parser=cast(Parser, "nope"))


_HEAD_PIECES = st.sampled_from(
    [
        b"Host: a",
        b"Content-Length: 5",
        b"Content-Length: 05",
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: Chunked",
        b"Connection: close",
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"X: \x01\t\x7f",
        b"X:",
        b" fold",
        b"Bad Name: x",
        b"X: a\x00",
        b"X: a\rb",
        b"X: a\nb",
        b"Y: x,y",
    ]
)
_ODD_BYTES = [bytes([c]) for c in b"aZ09-:;, \t\r\n\x00\x0b\x01\x7f\x80()"]
_HEAD_LINES = st.one_of(
    _HEAD_PIECES, st.lists(st.sampled_from(_ODD_BYTES), max_size=8).map(b"".join)
)
_START_LINES = st.sampled_from(
    [
        b"GET / HTTP/1.1",
        b"POST /x HTTP/1.0",
        b"GET / HTTP/2.0",
        b"GET  / HTTP/1.1",
        b"get * HTTP/1.1",
    ]
)


def _outcome(data: bytes, parser: Parser) -> object:
    try:
        return parse_request_head(data, 256, parser=parser)
    except HttpError as exc:
        return exc.status


@settings(max_examples=100, deadline=None)
@given(_START_LINES, st.lists(_HEAD_LINES, max_size=5), st.binary(max_size=4))
def test_fast_parser_agrees_with_h11(start: bytes, lines: list[bytes], tail: bytes) -> None:
    data = head_with(*lines, start=start) + tail
    for size in (len(data), len(data) - len(tail) - 1):
        assert _outcome(data[:size], "fast") == _outcome(data[:size], "h11")


# --- response heads --------------------------------------------------------------------------


def test_101_response(parser: Parser) -> None:
    data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    head = response(data, parser)
    assert (head.status, head.reason, head.version) == (101, b"Switching Protocols", b"1.1")
    assert head.body == BodyFraming("none") and not head.keep_alive
    assert head.header(b"upgrade") == b"websocket"


@pytest.mark.parametrize(
    ("data", "method", "body", "keep_alive"),
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", b"GET", "none", True),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET", "none", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", b"HEAD", "none", True),
        (b"HTTP/1.1 200 OK\r\n\r\n", b"HEAD", "none", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n", b"POST", "none", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: CHUNKED\r\n\r\n", b"GET", "chunked", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", b"GET", "length", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"GET", "none", True),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\n",
            b"GET",
            "length",
            False,
        ),
        (b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n", b"GET", "close", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\n", b"GET", "length", False),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\nConnection: keep-alive\r\n\r\n",
            b"GET",
            "length",
            True,
        ),
        (b"HTTP/1.1 200 Connection established\r\n\r\n", b"CONNECT", "none", False),
        (b"HTTP/1.1 404\r\nContent-Length: 7\r\n\r\n", b"GET", "length", True),
    ],
)
def test_response_framing(
    data: bytes, method: bytes, body: str, keep_alive: bool, parser: Parser
) -> None:
    head = response(data, parser, method)
    assert head.body.kind == body
    assert head.body.length == (7 if body == "length" else 0)
    assert head.keep_alive is keep_alive


def test_response_reason_may_be_missing_or_odd(parser: Parser) -> None:
    assert response(b"HTTP/1.1 404\r\n\r\n", parser).reason == b""
    assert response(b"HTTP/1.1 404 \r\n\r\n", parser).reason == b""
    assert response(b"HTTP/1.1 200 A \tb\x80\r\n\r\n", parser).reason == b"A \tb\x80"


def test_response_fed_byte_by_byte(parser: Parser) -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: a=b\r\n\r\n"
    for size in range(len(data)):
        assert parse_response_head(data[:size], b"GET", parser=parser) is None
    parsed = parse_response_head(data + b"5\r\nhello\r\n", b"GET", parser=parser)
    assert parsed is not None and parsed[1] == len(data)
    assert parsed == parse_response_head(data, b"GET", parser=parser)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 099 Odd\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\nServer: x\n\n",
        b"HTTP/1.1 200 OK\r\nServer: x\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    ],
)
def test_malformed_responses_are_502(data: bytes, parser: Parser) -> None:
    assert response_status(data, parser) == 502


def test_oversized_response_head_is_502(parser: Parser) -> None:
    big = b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD
    assert response_status(big, parser) == 502
    assert response_status(big + b"\r\n\r\n", parser) == 502


# --- rewrite_request -------------------------------------------------------------------------


def _forwarded(data: bytes) -> RequestHead:
    """Parse what rewrite_request produced (with h11, the reference)."""
    return request(data, "h11")


def _rewrite(head: RequestHead, *, keep_xff: bool = False, keep_alive: bool = True) -> bytes:
    return rewrite_request(
        head,
        client_ip="198.51.100.7",
        proto=b"https",
        port=8443,
        keep_xff=keep_xff,
        upstream_keep_alive=keep_alive,
    )


def test_rewrite_adds_forwarded_headers_and_drops_untrusted_xff(parser: Parser) -> None:
    head = request(
        head_with(
            b"Host: a",
            b"X-Forwarded-For: 10.0.0.1",
            b"X-Forwarded-Proto: http",
            b"x-forwarded-port: 1",
            b"Content-Length: 3",
            start=b"POST /p?q=1 HTTP/1.1",
        ),
        parser,
    )
    out = _rewrite(head)
    assert out.startswith(b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n")
    sent = _forwarded(out)
    assert sent.header(b"x-forwarded-for") == b"198.51.100.7"
    assert sent.header(b"x-forwarded-proto") == b"https"
    assert sent.header(b"x-forwarded-port") == b"8443"
    assert [name for name, _ in sent.headers].count(b"x-forwarded-proto") == 1
    assert sent.body == BodyFraming("length", 3) and sent.keep_alive


def test_rewrite_appends_to_trusted_xff(parser: Parser) -> None:
    head = request(
        head_with(b"Host: a", b"X-Forwarded-For: 10.0.0.1, 10.0.0.2", b"X-Forwarded-For: 10.0.0.3"),
        parser,
    )
    sent = _forwarded(_rewrite(head, keep_xff=True))
    assert sent.header(b"x-forwarded-for") == b"10.0.0.1, 10.0.0.2, 10.0.0.3, 198.51.100.7"
    alone = request(head_with(b"Host: a"), parser)
    assert _forwarded(_rewrite(alone, keep_xff=True)).header(b"x-forwarded-for") == b"198.51.100.7"


def test_rewrite_removes_hop_by_hop_headers(parser: Parser) -> None:
    head = request(
        head_with(
            b"Host: a",
            b"Connection: keep-alive, X-Secret, Content-Length",
            b"Keep-Alive: timeout=5",
            b"Proxy-Connection: keep-alive",
            b"TE: trailers",
            b"Trailer: X-Sum",
            b"Upgrade: h2c",
            b"X-Secret: 1",
            b"X-Kept: 2",
            b"Content-Length: 4",
            start=b"PUT /x HTTP/1.1",
        ),
        parser,
    )
    sent = _forwarded(_rewrite(head))
    names = {name for name, _ in sent.headers}
    assert names == {
        b"host",
        b"x-kept",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-port",
    }
    assert sent.body == BodyFraming("length", 4) and sent.keep_alive


def test_rewrite_closes_upstream_when_asked(parser: Parser) -> None:
    head = request(head_with(b"Host: a"), parser)
    sent = _forwarded(_rewrite(head, keep_alive=False))
    assert sent.header(b"connection") == b"close" and not sent.keep_alive


def test_rewrite_keeps_websocket_upgrade(parser: Parser) -> None:
    sent = _forwarded(_rewrite(request(BROWSER_WS, parser)))
    assert sent.websocket
    assert sent.header(b"upgrade") == b"websocket"
    assert sent.header(b"connection") == b"Upgrade"
    assert sent.header(b"sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert [name for name, _ in sent.headers].count(b"connection") == 1


def test_rewrite_sends_http11_with_a_host_for_http10(parser: Parser) -> None:
    sent = _forwarded(_rewrite(request(b"GET /x HTTP/1.0\r\nX-A: 1\r\n\r\n", parser)))
    assert sent.version == b"1.1" and sent.header(b"host") == b""
    absolute = request(b"GET http://u@example.com:81/x HTTP/1.0\r\n\r\n", parser)
    assert _forwarded(_rewrite(absolute)).header(b"host") == b"example.com:81"
    hosted = _forwarded(_rewrite(request(b"GET / HTTP/1.0\r\nHost: h\r\n\r\n", parser)))
    assert [value for name, value in hosted.headers if name == b"host"] == [b"h"]


def test_rewrite_keeps_original_header_case(parser: Parser) -> None:
    out = _rewrite(request(head_with(b"hOsT: a", b"X-CamelCase: v"), parser))
    assert b"\r\nhOsT: a\r\nX-CamelCase: v\r\n" in out
    assert out.endswith(b"\r\n\r\n")


# --- add_response_headers / error_response ---------------------------------------------------


def test_add_response_headers(parser: Parser) -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    out = add_response_headers(raw, [(b"Set-Cookie", b"lb=k1; Path=/"), (b"X-B", b"b")])
    assert out.startswith(raw[:-2]) and out.endswith(b"X-B: b\r\n\r\n")
    head = response(out, parser)
    assert head.header(b"set-cookie") == b"lb=k1; Path=/" and head.header(b"x-b") == b"b"
    assert add_response_headers(raw, []) == raw


@pytest.mark.parametrize(
    ("raw", "extra"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", [(b"Set-Cookie", b"a\r\nX-Evil: 1")]),
        (b"HTTP/1.1 200 OK\r\n\r\n", [(b"Bad Name", b"v")]),
        (b"HTTP/1.1 200 OK\r\n", [(b"X", b"v")]),
    ],
)
def test_add_response_headers_refuses_bad_input(
    raw: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    with pytest.raises(ValueError):
        add_response_headers(raw, extra)


@pytest.mark.parametrize("status", [400, 404, 405, 408, 413, 431, 500, 501, 502, 503, 504, 505])
def test_error_response_is_a_complete_response(status: int) -> None:
    data = error_response(status, detail="bad\r\nthing", extra_headers=[(b"Retry-After", b"1")])
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    events: list[object] = []
    while not events or not isinstance(events[-1], h11.EndOfMessage):
        event = conn.next_event()
        assert event is not h11.NEED_DATA
        events.append(event)
    head, body = events[0], events[1]
    assert isinstance(head, h11.Response) and isinstance(body, h11.Data)
    assert head.status_code == status and head.reason
    headers = dict(head.headers)
    assert headers[b"connection"] == b"close" and headers[b"retry-after"] == b"1"
    assert headers[b"content-type"].startswith(b"text/plain")
    assert body.data == f"{status} {head.reason.decode()}: bad??thing\n".encode()
    assert body.data.count(b"\n") == 1


def test_error_response_reasons_and_limits() -> None:
    assert error_response(431).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert error_response(505).startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
    assert error_response(418).startswith(b"HTTP/1.1 418 I'm a Teapot\r\n")
    assert error_response(599).startswith(b"HTTP/1.1 599 Error\r\n")
    with pytest.raises(ValueError):
        error_response(200)


# --- body trackers ---------------------------------------------------------------------------


def _chunked_body(chunks: list[bytes], extensions: list[bytes], trailers: list[bytes]) -> bytes:
    out = []
    for index, chunk in enumerate(chunks):
        ext = extensions[index % len(extensions)] if extensions else b""
        out.append(b"%x%s\r\n%s\r\n" % (len(chunk), ext, chunk))
    out.append(b"0\r\n")
    out.extend(trailer + b"\r\n" for trailer in trailers)
    out.append(b"\r\n")
    return b"".join(out)


def _feed_pieces(tracker: ChunkedTracker | LengthTracker, stream: bytes, cuts: list[int]) -> int:
    """Feed ``stream`` cut at ``cuts``; the end of the body in stream coordinates, or -1."""
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for low, high in itertools.pairwise(bounds):
        piece = stream[low:high]
        end = tracker.feed(memoryview(piece) if low % 2 else piece)
        if end >= 0:
            return low + end
    return -1


_CHUNKS = st.lists(st.binary(min_size=1, max_size=300), max_size=6)
_EXTENSIONS = st.lists(st.sampled_from([b"", b";a=1", b" ;name", b';q="x;y"', b"\t"]), max_size=3)
_TRAILERS = st.lists(st.sampled_from([b"X-Sum: 12", b"Expires:", b"a-b: c d"]), max_size=3)


@settings(max_examples=100, deadline=None)
@given(_CHUNKS, _EXTENSIONS, _TRAILERS, st.lists(st.integers(0, 3000), max_size=12))
def test_chunked_tracker_finds_the_end_under_any_split(
    chunks: list[bytes], extensions: list[bytes], trailers: list[bytes], cuts: list[int]
) -> None:
    body = _chunked_body(chunks, extensions, trailers)
    stream = body + b"GET /next HTTP/1.1\r\n"
    cuts = [cut for cut in cuts if cut < len(stream)]
    tracker = ChunkedTracker()
    assert _feed_pieces(tracker, stream, cuts) == len(body)
    assert tracker.done
    assert tracker.feed(b"more", 1) == 1


@settings(max_examples=50, deadline=None)
@given(_CHUNKS, st.integers(0, 2000))
def test_chunked_tracker_start_offset_and_exact_end(chunks: list[bytes], prefix: int) -> None:
    body = _chunked_body(chunks, [], [])
    tracker = ChunkedTracker()
    assert tracker.feed(b"x" * prefix + body, prefix) == prefix + len(body)
    unfinished = ChunkedTracker()
    assert unfinished.feed(b"x" * prefix + body[:-1], prefix) == -1
    assert unfinished.feed(body[-1:]) == 1


def test_chunked_tracker_byte_by_byte_with_trailers() -> None:
    body = b"4;x=y\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n"
    tracker = ChunkedTracker()
    ends = [tracker.feed(body[i : i + 1]) for i in range(len(body))]
    assert ends == [-1] * (len(body) - 1) + [1]


class _LengthOnly:
    """Bytes whose content must not be touched: only len() works."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: object) -> bytes:
        raise AssertionError("chunk data was read")


def test_chunked_tracker_does_not_look_at_chunk_data() -> None:
    tracker = ChunkedTracker()
    assert tracker.feed(b"40000000\r\n") == -1  # a 1 GiB chunk
    for _ in range(16):
        assert tracker.feed(cast(bytes, _LengthOnly(1 << 26))) == -1
    assert tracker.feed(b"\r\n0\r\n\r\nrest") == 7


@pytest.mark.parametrize(
    "body",
    [
        b"g\r\n",
        b"-1\r\n",
        b"\r\n",
        b" 5\r\nhello\r\n",
        b"0x5\r\nhello\r\n",
        b"11111111111111111\r\n",
        b"5\nhello\r\n",
        b"15\nhello\r\n",
        b"0\r\nX: 1\rY: 2\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"5\r\nhello\r0\r\n\r\n",
        b"5\r\nhello\n0\r\n\r\n",
        b"5;a\rb\r\nhello\r\n",
        b"0\r\nno colon\r\n\r\n",
        b"0\r\n folded: x\r\n\r\n",
        b"0\r\nX: a\n\r\n",
        b"1;" + b"e" * MAX_LINE + b"\r\n",
    ],
)
def test_chunked_tracker_refuses_bad_syntax(body: bytes) -> None:
    for error_status in (400, 502):
        with pytest.raises(HttpError) as info:
            _feed_pieces(ChunkedTracker(error_status), body, [1, 3, len(body) - 2])
        assert info.value.status == error_status


def test_chunked_tracker_limits_size_lines_across_feeds() -> None:
    tracker = ChunkedTracker()
    assert tracker.feed(b"1;" + b"e" * (MAX_LINE - 2)) == -1
    with pytest.raises(HttpError):
        tracker.feed(b"eee\r\n")
    ok = ChunkedTracker()
    assert ok.feed(b"1;" + b"e" * (MAX_LINE - 3)) == -1
    assert ok.feed(b"\r\nx\r\n0\r\n\r\n") == 10


@pytest.mark.parametrize("ext", [61, 62, 200, MAX_LINE - 4])
def test_chunked_tracker_long_size_lines_in_a_memoryview(ext: int) -> None:
    body = b"1;" + b"e" * ext + b"\r\nx\r\n0\r\n\r\n"
    assert ChunkedTracker().feed(memoryview(body + b"next")) == len(body)
    assert ChunkedTracker().feed(memoryview(b"junk" + body), 4) == 4 + len(body)


def test_chunked_tracker_limits_trailers() -> None:
    tracker = ChunkedTracker()
    trailer = b"X-T: " + b"t" * 1000 + b"\r\n"
    with pytest.raises(HttpError, match="trailer"):
        tracker.feed(b"0\r\n" + trailer * 70)


@pytest.mark.parametrize("length", [0, 1, 10, 1000])
def test_length_tracker(length: int) -> None:
    stream = b"b" * length + b"NEXT"
    for cuts in ([], [1], [3, 7], list(range(0, len(stream), 3))):
        assert _feed_pieces(LengthTracker(length), stream, cuts) == length
    tracker = LengthTracker(length)
    assert tracker.feed(b"x" * 5 + stream, 5) == 5 + length
    assert tracker.done and tracker.remaining == 0


def test_length_tracker_counts_down_without_reading() -> None:
    tracker = LengthTracker(3 << 26)
    for _ in range(2):
        assert tracker.feed(cast(bytes, _LengthOnly(1 << 26))) == -1
    assert tracker.remaining == 1 << 26
    assert tracker.feed(cast(bytes, _LengthOnly(1 << 26))) == 1 << 26
    with pytest.raises(ValueError):
        LengthTracker(-1)
