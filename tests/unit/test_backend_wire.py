"""Unit tests of the backend's sans-IO parts (wire.ServerConnection, routes): no sockets."""

from __future__ import annotations

import json

import h11
import pytest
import wsproto
import wsproto.events as we
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection as WsFramer

from lbproxy.backend.routes import (
    PATTERN_PERIOD,
    Response,
    ServerView,
    StreamResponse,
    route_http,
    slow_body,
)
from lbproxy.backend.wire import (
    HttpRequest,
    Phase,
    ServerConnection,
    WebSocketRequest,
    WsClosed,
    WsMessage,
    WsMessageTooBig,
)

VIEW = ServerView("b1", 3, False, b"<html>chat</html>")


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Decode the server's output with an h11 client (as many responses as were sent)."""
    client = h11.Connection(h11.CLIENT)
    out: list[tuple[int, dict[str, str], bytes]] = []
    client.receive_data(data)
    while True:
        client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                return out
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append((status, headers, body))
                break
        if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
            return out
        client.start_next_cycle()


def serve_http(conn: ServerConnection, view: ServerView = VIEW) -> list[HttpRequest]:
    """Answer every complete request with route_http (streams answered in one go)."""
    seen: list[HttpRequest] = []
    while events := conn.next_events():
        for event in events:
            assert isinstance(event, HttpRequest)
            seen.append(event)
            response = route_http(event, view)
            if isinstance(response, Response):
                conn.send_response(response.status, response.headers, response.body)
            else:
                conn.start_stream(response.status, response.headers)
                conn.send_chunk(slow_body(0, response.total))
                conn.end_stream()
    return seen


def test_keep_alive_pipelined_requests_are_answered_in_order() -> None:
    conn = ServerConnection()
    conn.receive_data(
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /whoami HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    requests = serve_http(conn)
    assert [r.path for r in requests] == ["/healthz", "/whoami", "/nowhere", "/"]
    responses = parse_responses(conn.data_to_send())
    assert [r[0] for r in responses] == [200, 200, 404, 200]
    assert responses[0][2] == b"ok"
    assert json.loads(responses[1][2]) == {"id": "b1", "connections": 3}
    assert responses[3][1]["content-type"].startswith("text/html")
    assert responses[3][2] == b"<html>chat</html>"
    assert not conn.must_close


def test_connection_close_is_honoured() -> None:
    conn = ServerConnection()
    conn.receive_data(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    serve_http(conn)
    assert parse_responses(conn.data_to_send())[0][0] == 200
    assert conn.must_close


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * (70 * 1024) + b"\r\n\r\n", 431),
    ],
)
def test_protocol_errors_get_a_response_and_close(raw: bytes, status: int) -> None:
    conn = ServerConnection()
    for start in range(0, len(raw), 4096):  # as a socket would deliver it
        conn.receive_data(raw[start : start + 4096])
        assert conn.next_events() == []
        if conn.must_close:
            break
    assert conn.must_close
    assert parse_responses(conn.data_to_send())[0][0] == status


def test_post_echo_body_content_length_and_chunked() -> None:
    conn = ServerConnection()
    conn.receive_data(
        b"POST /echo-body HTTP/1.1\r\nHost: a\r\nContent-Type: text/x\r\nContent-Length: 5\r\n\r\n"
        b"hello"
        b"POST /echo-body HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    serve_http(conn)
    responses = parse_responses(conn.data_to_send())
    assert [(r[0], r[2]) for r in responses] == [(200, b"hello"), (200, b"abcdefg")]
    assert responses[0][1]["content-type"] == "text/x"


def test_oversize_body_gets_413() -> None:
    conn = ServerConnection(max_body=10)
    conn.receive_data(b"POST /echo-body HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n")
    conn.receive_data(b"x" * 11)
    assert conn.next_events() == []
    assert parse_responses(conn.data_to_send())[0][0] == 413
    assert conn.must_close


def test_headers_route_echoes_request_headers() -> None:
    conn = ServerConnection()
    conn.receive_data(b"GET /headers HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n")
    serve_http(conn)
    body = parse_responses(conn.data_to_send())[0][2]
    assert ["x-forwarded-for", "10.0.0.1"] in json.loads(body)
    assert ["host", "a"] in json.loads(body)


def test_slow_streams_chunked() -> None:
    conn = ServerConnection()
    conn.receive_data(b"GET /slow?bytes=1000&chunk=100 HTTP/1.1\r\nHost: a\r\n\r\n")
    (request,) = conn.next_events()
    assert isinstance(request, HttpRequest)
    response = route_http(request, VIEW)
    assert isinstance(response, StreamResponse)
    assert (response.total, response.chunk, response.delay) == (1000, 100, 0)
    conn.start_stream(response.status, response.headers)
    for offset in range(0, 1000, 100):
        conn.send_chunk(slow_body(offset, 100))
    conn.end_stream()
    raw = conn.data_to_send()
    assert b"transfer-encoding: chunked" in raw.lower()
    ((status, _, body),) = parse_responses(raw)
    assert (status, body) == (200, slow_body(0, 1000))


@pytest.mark.parametrize(
    "query", ["bytes=-1", "bytes=x", "bytes=10&chunk=0", "bytes=1&delay_ms=999999"]
)
def test_slow_bad_query_is_400(query: str) -> None:
    request = HttpRequest("GET", f"/slow?{query}", (("host", "a"),))
    response = route_http(request, VIEW)
    assert isinstance(response, Response) and response.status == 400


def test_route_methods_and_draining() -> None:
    assert route_http(HttpRequest("POST", "/healthz", ()), VIEW).status == 405
    assert route_http(HttpRequest("GET", "/echo-body", ()), VIEW).status == 405
    assert route_http(HttpRequest("GET", "/echo", ()), VIEW).status == 426
    draining = ServerView("b1", 0, True, b"")
    response = route_http(HttpRequest("GET", "/healthz", ()), draining)
    assert isinstance(response, Response) and (response.status, response.body) == (503, b"draining")


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(0, 10**6), size=st.integers(0, 70_000), split=st.integers(0, 70_000))
def test_slow_body_is_a_seamless_pattern(offset: int, size: int, split: int) -> None:
    split = min(split, size)
    whole = slow_body(offset, size)
    assert len(whole) == size
    assert whole == slow_body(offset, split) + slow_body(offset + split, size - split)
    assert all(b == (offset + i) % PATTERN_PERIOD for i, b in enumerate(whole[:300]))


# ---- websocket -------------------------------------------------------------------------------


def upgrade(conn: ServerConnection, target: str = "/echo", extra: bytes = b"") -> WsClient:
    client = WsClient(target)
    conn.receive_data(client.handshake + extra)
    (event,) = conn.next_events()
    assert isinstance(event, WebSocketRequest)
    assert event.path == target.split("?")[0]
    conn.accept_websocket([("set-cookie", "session=abc")])
    client.receive(conn.data_to_send())
    assert client.accepted is not None
    return client


class WsClient:
    """A wsproto client that produces masked frames for the server under test."""

    def __init__(self, target: str) -> None:
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.handshake = self.ws.send(we.Request(host="a", target=target))
        self.framer = WsFramer(wsproto.ConnectionType.CLIENT)  # masked frames at any time
        self.accepted: we.AcceptConnection | None = None
        self.events: list[we.Event] = []

    def receive(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, we.AcceptConnection):
                self.accepted = event
            else:
                self.events.append(event)

    def send(self, event: we.Event) -> bytes:
        return self.framer.send(event)


def echo(conn: ServerConnection) -> list[object]:
    events: list[object] = list(conn.next_events())
    for event in events:
        if isinstance(event, WsMessage):
            conn.send_message(event.data)
    return events


@pytest.mark.parametrize("payload", ["é" * 3, "x", b"\x00\xff", b"y" * 70_000, "z" * 200_000])
def test_websocket_echo_text_and_binary(payload: str | bytes) -> None:
    conn = ServerConnection()
    client = upgrade(conn)
    assert ("set-cookie", "session=abc") in [
        (k.decode().lower(), v.decode())
        for k, v in client.accepted.extra_headers  # type: ignore[union-attr]
    ]
    assert conn.phase is Phase.WEBSOCKET
    message = we.TextMessage(data=payload) if isinstance(payload, str) else we.BytesMessage(payload)
    conn.receive_data(client.send(message))
    assert echo(conn) == [WsMessage(payload)]
    client.receive(conn.data_to_send())
    got = client.events
    assert all(isinstance(e, we.Message) for e in got)
    joined = (
        "".join(e.data for e in got)  # type: ignore[attr-defined]
        if isinstance(payload, str)
        else b"".join(e.data for e in got)  # type: ignore[attr-defined]
    )
    assert joined == payload


def test_fragmented_message_is_assembled_and_frames_right_after_handshake() -> None:
    conn = ServerConnection()
    client = WsClient("/echo")
    first = client.send(we.Message(data="hel", message_finished=False))
    conn.receive_data(client.handshake)
    (event,) = conn.next_events()
    assert isinstance(event, WebSocketRequest)
    # frames that were pipelined behind the upgrade request must not be lost
    conn.receive_data(first)
    conn.accept_websocket()
    conn.receive_data(client.send(we.Message(data="lo", message_finished=True)))
    assert conn.next_events() == [WsMessage("hello")]


def test_too_big_message_is_discarded_and_reported() -> None:
    conn = ServerConnection(max_message=100)
    client = upgrade(conn)
    conn.receive_data(client.send(we.Message(data=b"a" * 60, message_finished=False)))
    conn.receive_data(client.send(we.Message(data=b"a" * 60, message_finished=True)))
    conn.receive_data(client.send(we.Message(data="ok")))
    assert conn.next_events() == [WsMessageTooBig(120), WsMessage("ok")]


def test_ping_is_answered_and_close_handshake_completes() -> None:
    conn = ServerConnection()
    client = upgrade(conn)
    conn.receive_data(client.send(we.Ping(payload=b"p")))
    assert conn.next_events() == []
    client.receive(conn.data_to_send())
    assert client.events == [we.Pong(payload=b"p")]
    conn.receive_data(client.send(we.CloseConnection(code=1000, reason="bye")))
    assert conn.next_events() == [WsClosed(1000, "bye")]
    assert conn.must_close
    client.receive(conn.data_to_send())
    assert isinstance(client.events[-1], we.CloseConnection)
    assert client.events[-1].code == 1000


def test_server_initiated_close_and_lost_connection() -> None:
    conn = ServerConnection()
    client = upgrade(conn)
    conn.close_websocket(1001, "going away")
    assert not conn.websocket_open
    assert not conn.send_message("late")
    client.receive(conn.data_to_send())
    assert client.events[-1] == we.CloseConnection(code=1001, reason="going away")
    conn.receive_data(client.send(we.CloseConnection(code=1001, reason="going away")))
    assert conn.next_events() == [WsClosed(1001, "going away")]
    assert conn.must_close

    other = ServerConnection()
    upgrade(other)
    other.receive_data(b"")
    assert other.next_events() == [WsClosed(1006, "")]


def test_bad_frame_closes_with_protocol_error() -> None:
    conn = ServerConnection()
    upgrade(conn)
    conn.receive_data(b"\x81\x05hello")  # unmasked client frame: a protocol error
    (event,) = conn.next_events()
    assert isinstance(event, WsClosed) and event.code == 1002
    assert conn.must_close
    assert conn.data_to_send()[:1] == b"\x88"  # our close frame


def test_invalid_upgrade_gets_http_error_and_reject_keeps_http() -> None:
    conn = ServerConnection()
    conn.receive_data(
        b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert conn.next_events() == []
    assert parse_responses(conn.data_to_send())[0][0] == 400

    conn2 = ServerConnection()
    client = WsClient("/nope")
    conn2.receive_data(client.handshake + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    (event,) = conn2.next_events()
    assert isinstance(event, WebSocketRequest)
    conn2.reject_websocket(404, b"not found")
    assert conn2.phase is Phase.HTTP
    serve_http(conn2)
    assert [r[0] for r in parse_responses(conn2.data_to_send())] == [404, 200]
