"""Head hygiene (README "Proxying"): chunk sizes of 2^63 or more, invalid Host values, absolute-form
targets forwarded in origin form, Forwarded / X-Real-IP only from trusted peers. In-process on
both parsers and the fast lanes, then once end to end through a real lbproxy."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbproxy.core.http1 import (
    ChunkedTracker,
    Parser,
    RequestHead,
    parse_request_head,
    rewrite_request,
    rewrite_response,
)
from lbproxy.core.http1._common import valid_host
from lbproxy.core.http1.lanes import quick_request, quick_websocket
from lbproxy.errors import HttpError
from tests.e2e.test_native_upgrade import read_head
from tests.e2e.test_tunnel import TcpServer
from tests.support import Lbproxy, proxy_config, wait_until

PARSERS: list[Parser] = ["fast", "h11"]


def status_of(data: bytes, parser: Parser) -> int:
    try:
        parse_request_head(data, parser=parser)
    except HttpError as exc:
        return exc.status
    return 200


def parsed(data: bytes, parser: Parser = "fast") -> RequestHead:
    result = parse_request_head(data, parser=parser)
    assert result is not None
    return result[0]


def forwarded(head: RequestHead, *, trusted: bool = False) -> RequestHead:
    out = rewrite_request(
        head,
        client_ip="1.2.3.4",
        proto=b"http",
        port=80,
        keep_xff=trusted,
        upstream_keep_alive=True,
    )
    return parsed(out)


# --- chunk sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 502])
def test_chunk_size_of_2_to_the_63_or_more_is_refused(status: int) -> None:
    for size in ("8000000000000000", "FFFFFFFFFFFFFFFF", "c000000000000001"):
        tracker = ChunkedTracker(status)
        with pytest.raises(HttpError) as info:
            tracker.feed(f"{size}\r\n".encode())
        assert info.value.status == status
    largest = ChunkedTracker(status)  # 2^63 - 1 is a size an int64 parser reads right
    assert largest.feed(b"7FFFFFFFFFFFFFFF\r\nabc") == -1
    assert not largest.done


def test_chunk_size_split_across_feeds_is_refused_too() -> None:
    tracker = ChunkedTracker()
    assert tracker.feed(b"5\r\nhello\r\n8000") == -1
    with pytest.raises(HttpError):
        tracker.feed(b"000000000000\r\n")


# --- Host -------------------------------------------------------------------------------------

GOOD_HOSTS = [b"a", b"a.example", b"a.example:8080", b"10.0.0.1:1", b"[::1]", b"[::1]:81", b"x:"]
GOOD_HOSTS += [b"xn--caf-dma.example", b"a%41b", b"[v1.fe]", b""]
BAD_HOSTS = [b"a b", b"user@host", b"a/b", b"a:8x", b"[::1", b"[zz::]", b"a?b", b"a#b", b'"a"']
BAD_HOSTS += [b"[::1]x", b"a:1:2", b"%zz"]


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_valid_hosts(host: bytes) -> None:
    assert valid_host(host)


@pytest.mark.parametrize("host", BAD_HOSTS)
@pytest.mark.parametrize("parser", PARSERS)
def test_invalid_host_is_400_on_both_parsers_and_no_lane_takes_it(
    host: bytes, parser: Parser
) -> None:
    assert not valid_host(host)
    head = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    assert status_of(head, parser) == 400
    assert not quick_request(head)
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: " + host + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert status_of(upgrade, parser) == 400
    assert not quick_websocket(upgrade)


@pytest.mark.parametrize("parser", PARSERS)
def test_absolute_form_with_a_bad_authority_is_400(parser: Parser) -> None:
    assert status_of(b"GET http://a b/x HTTP/1.1\r\nHost: a\r\n\r\n", parser) == 400
    assert status_of(b"GET http://a:9z/x HTTP/1.1\r\nHost: a\r\n\r\n", parser) == 400
    assert status_of(b"GET http://a.example:81/x HTTP/1.1\r\nHost: a\r\n\r\n", parser) == 200


def test_lanes_still_take_ordinary_hosts() -> None:
    assert quick_request(b"GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n")
    assert quick_websocket(
        b"GET /ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )


# --- absolute-form targets, Forwarded / X-Real-IP -------------------------------------------


@pytest.mark.parametrize("parser", PARSERS)
def test_absolute_form_is_forwarded_in_origin_form_with_its_host(parser: Parser) -> None:
    head = parsed(b"GET http://a.example:81/x?y=1 HTTP/1.1\r\nHost: other\r\n\r\n", parser)
    sent = forwarded(head)
    assert sent.target == b"/x?y=1"
    assert [v for n, v in sent.headers if n == b"host"] == [b"a.example:81"]
    bare = forwarded(parsed(b"GET http://a.example?q HTTP/1.1\r\nHost: a.example\r\n\r\n", parser))
    assert bare.target == b"/?q" and bare.header(b"host") == b"a.example"
    origin = forwarded(parsed(b"GET /p HTTP/1.1\r\nHost: h\r\n\r\n", parser))
    assert origin.target == b"/p" and origin.header(b"host") == b"h"


@pytest.mark.parametrize("parser", PARSERS)
def test_forwarded_and_x_real_ip_only_from_trusted_peers(parser: Parser) -> None:
    head = parsed(
        b"GET / HTTP/1.1\r\nHost: h\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
        b"X-Other: 1\r\n\r\n",
        parser,
    )
    untrusted = forwarded(head)
    assert untrusted.header(b"forwarded") is None and untrusted.header(b"x-real-ip") is None
    assert untrusted.header(b"x-other") == b"1"
    trusted = forwarded(head, trusted=True)
    assert trusted.header(b"forwarded") == b"for=6.6.6.6"
    assert trusted.header(b"x-real-ip") == b"6.6.6.6"
    assert not quick_request(b"GET / HTTP/1.1\r\nHost: h\r\nX-Real-IP: 1\r\n\r\n")
    assert not quick_request(b"GET / HTTP/1.1\r\nHost: h\r\nforwarded: for=x\r\n\r\n")


def test_rewrite_response_says_keep_alive_only_when_asked_and_not_closing() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert b"Connection: keep-alive\r\n" in rewrite_response(raw, close=False, keep_alive=True)
    both = rewrite_response(raw, close=True, keep_alive=True)
    assert b"keep-alive" not in both and b"Connection: close\r\n" in both
    assert b"Connection" not in rewrite_response(raw, close=False)


# --- end to end ------------------------------------------------------------------------------


def capture(conn: socket.socket) -> bytes:
    """A backend that records the request head it got and answers 200."""
    head = read_head(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    return head


@pytest.fixture
def lbs(tmp_path: Path) -> Iterator[tuple[TcpServer, int, int]]:
    """(backend, port of an lbproxy that trusts nobody, port of one that trusts 127.0.0.0/8)."""
    server = TcpServer(capture)
    addr = f"127.0.0.1:{server.port}"
    plain, plain_port, _ = proxy_config([("b1", addr)])
    trusting, trusting_port, _ = proxy_config(
        [("b1", addr)], listener={"trusted_proxies": ["127.0.0.0/8"]}
    )
    procs = [Lbproxy(plain, tmp_path, name="plain"), Lbproxy(trusting, tmp_path, name="trust")]
    try:
        procs[0].start(wait_ports=(plain_port,))
        procs[1].start(wait_ports=(trusting_port,))
        yield server, plain_port, trusting_port
    finally:
        for proc in procs:
            proc.stop()
        server.close()


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(request)
        return read_head(c)


def seen(server: TcpServer, request: bytes, port: int) -> bytes:
    """Send ``request`` through lbproxy (200 expected): the head the backend got."""
    count = len(server.results)
    assert exchange(port, request).startswith(b"HTTP/1.1 200 ")
    wait_until(lambda: len(server.results) > count)
    got = server.results[count]
    assert isinstance(got, bytes)
    return got


def test_end_to_end(lbs: tuple[TcpServer, int, int]) -> None:
    server, plain, trusting = lbs
    # absolute form: the backend sees origin form and the authority as Host
    got = seen(server, b"GET http://a.example:81/x?q HTTP/1.1\r\nHost: wrong\r\n\r\n", plain)
    assert got.startswith(b"GET /x?q HTTP/1.1\r\n")
    assert b"\r\nHost: a.example:81\r\n" in got and b"wrong" not in got
    # Forwarded / X-Real-IP: removed from an untrusted peer, kept from a trusted one
    spoof = b"GET / HTTP/1.1\r\nHost: h\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\r\n"
    got = seen(server, spoof, plain)
    assert b"6.6.6.6" not in got and got.startswith(b"GET / HTTP/1.1\r\n")
    got = seen(server, spoof, trusting)
    assert b"Forwarded: for=6.6.6.6\r\n" in got and b"X-Real-IP: 6.6.6.6\r\n" in got
    # bad Host values and a huge chunk size: 400, and the backend sees nothing
    count = len(server.results)
    for host in (b"a b", b"user@host"):
        answer = exchange(plain, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert len(server.results) == count
    huge = (
        b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nabc"
    )
    assert exchange(plain, huge).startswith(b"HTTP/1.1 400 ")
