"""The fast lanes agree with the full parser wherever they take a head."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.core.http1 import parse_request_head, parse_response_head
from lbproxy.core.http1.lanes import quick_request, quick_response
from lbproxy.errors import HttpError

REQUEST = b"GET /x?y=1 HTTP/1.1\r\nHost: example\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\n"


def test_plain_get_and_plain_response_take_the_lane() -> None:
    assert quick_request(REQUEST)
    assert quick_request(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    assert quick_response(RESPONSE) == (200, 12)
    assert quick_response(b"HTTP/1.1 404 \r\ncontent-length: 0\r\n\r\n") == (404, 0)


def test_anything_unusual_goes_to_the_full_parser() -> None:
    slow = [
        b"POST / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host: the full parser answers 400
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX\x00: b\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    ]
    for head in slow:
        assert not quick_request(head), head
    for head in [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
    ]:
        assert quick_response(head) is None, head


names = st.sampled_from(
    [b"Host", b"host", b"HOST", b"Content-Length", b"Transfer-Encoding", b"Connection",
     b"Upgrade", b"X-Forwarded-For", b"Accept", b"Cookie", b"X-Y", b"TE", b"Te ", b"Bad Name",
     b"Keep-Alive", b"Expect"]
)  # fmt: skip
values = st.sampled_from([b"a", b"", b" x ", b"chunked", b"close", b"5", b"1, 1", b"\x00", b"\tv"])
lines = st.lists(st.tuples(names, values), max_size=5)
starts = st.sampled_from(
    [b"GET / HTTP/1.1", b"GET /a?b HTTP/1.1", b"HEAD / HTTP/1.1", b"GET / HTTP/1.0",
     b"GET  / HTTP/1.1", b"get / HTTP/1.1"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(start=starts, fields=lines)
def test_quick_request_implies_the_full_parser_agrees(
    start: bytes, fields: list[tuple[bytes, bytes]]
) -> None:
    head = start + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    if not quick_request(head):
        return
    parsed = parse_request_head(head)
    assert parsed is not None
    request, used = parsed
    assert used == len(head)
    assert request.method == b"GET" and request.body.kind == "none"
    assert request.keep_alive and not request.websocket
    dropped = {b"connection", b"keep-alive", b"te", b"trailer", b"upgrade", b"proxy-connection"}
    assert not any(n in dropped or n.startswith(b"x-forwarded-") for n, _ in request.headers)


statuses = st.sampled_from([b"200 OK", b"404 Not Found", b"204 No", b"304 x", b"101 S", b"500"])


@settings(max_examples=300, deadline=None)
@given(status=statuses, fields=lines)
def test_quick_response_implies_the_full_parser_agrees(
    status: bytes, fields: list[tuple[bytes, bytes]]
) -> None:
    head = b"HTTP/1.1 " + status + b"\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    quick = quick_response(head)
    if quick is None:
        return
    try:
        parsed = parse_response_head(head, b"GET")
    except HttpError as exc:  # pragma: no cover - a disagreement
        raise AssertionError(f"lane took a head the parser refuses: {head!r}") from exc
    assert parsed is not None
    response, used = parsed
    assert used == len(head) and response.keep_alive
    assert response.body.kind in ("length", "none")
    assert (response.status, response.body.length) == quick


WS = (
    b"GET /chat?user=a HTTP/1.1\r\nHost: example:8080\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: http://example:8080\r\n\r\n"
)


def test_websocket_lane() -> None:
    from lbproxy.core.http1.lanes import quick_websocket, switching_protocols

    assert quick_websocket(WS)
    assert not quick_request(WS)
    for bad in (
        WS.replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"),
        WS.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        WS.replace(b"HTTP/1.1", b"HTTP/1.0"),
        WS.replace(b"Host: example:8080\r\n", b""),
        WS.replace(b"Origin", b"X-Forwarded-For"),
        WS + b"x",
        WS.replace(b"\r\n\r\n", b"\r\nHost: other\r\n\r\n"),
        WS.replace(b"\r\n\r\n", b"\r\nupgrade: websocket\r\n\r\n"),
        WS.replace(b"\r\n\r\n", b"\r\nCONNECTION: upgrade\r\n\r\n"),
        WS.replace(b"GET", b"get"),  # (matched in lower case: the method and version are not)
        WS.replace(b"HTTP/1.1", b"http/1.1"),
        WS.replace(b"Host: ", b"Host:"),
        WS.replace(b"Host: example:8080", b"Host: [::1]:8080"),
        WS.replace(b"Origin", b"Te"),
    ):
        assert not quick_websocket(bad), bad
    for good in (
        WS.replace(b"Upgrade: websocket", b"UPGRADE: WebSocket"),
        WS.replace(b"Host: example:8080", b"host:   example:8080 "),
    ):
        assert quick_websocket(good), good
    ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    assert switching_protocols(ok)
    assert not switching_protocols(ok.replace(b"101", b"200"))
    assert not switching_protocols(ok.replace(b"Upgrade: websocket", b"Upgrade : websocket"))


ws_names = st.sampled_from(
    [b"Host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key", b"Content-Length", b"TE",
     b"Transfer-Encoding", b"X-Forwarded-Proto", b"Cookie", b"Keep-Alive"]
)  # fmt: skip
ws_values = st.sampled_from([b"websocket", b"Upgrade", b"upgrade", b"a", b"0", b"chunked", b"x y"])


REQUIRED = [(b"Host", b"h"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(st.tuples(ws_names, ws_values), max_size=4).flatmap(
        lambda extra: st.permutations(REQUIRED + extra)
    )
)
def test_quick_websocket_implies_the_full_parser_agrees(fields: list[tuple[bytes, bytes]]) -> None:
    from lbproxy.core.http1 import rewrite_request
    from lbproxy.core.http1.lanes import quick_websocket

    head = b"GET /ws HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    if not quick_websocket(head):
        return
    parsed = parse_request_head(head)
    assert parsed is not None and parsed[1] == len(head)
    request = parsed[0]
    assert request.websocket and request.body.kind == "none"
    # what the full path would send carries the same lines as head + the forwarding lines
    full = rewrite_request(
        request, client_ip="1.2.3.4", proto=b"http", port=80, keep_xff=False,
        upstream_keep_alive=True,
    )  # fmt: skip
    suffix = b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\n"
    quick = head[:-2] + suffix + b"\r\n"
    assert sorted(full.lower().split(b"\r\n")) == sorted(quick.lower().split(b"\r\n"))


def test_rewrite_response_drops_the_backends_hop_by_hop_headers() -> None:
    from lbproxy.core.http1 import rewrite_response

    raw = (
        b"HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\nKeep-Alive: timeout=5\r\n"
        b"X-Private: secret\r\nContent-Length: 2\r\nX-Kept: yes\r\n\r\n"
    )
    out = rewrite_response(raw, close=False, extra=[(b"Set-Cookie", b"a=b")])
    assert out == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Kept: yes\r\nSet-Cookie: a=b\r\n\r\n"
    )
    closing = rewrite_response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", close=True)
    assert closing.endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    # Connection may not remove the framing (a smuggling trick)
    tricky = b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\n"
    assert b"Content-Length: 2" in rewrite_response(tricky, close=False)
    parsed = parse_response_head(out, b"GET")
    assert parsed is not None and parsed[0].body.length == 2
