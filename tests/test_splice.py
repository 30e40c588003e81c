"""The native tunnel engine (lbproxy._splice) on real socket pairs, without an event loop.

Each test builds a tunnel from two socket pairs: (client app <-> proxy side) and
(proxy side <-> backend app); the engine owns the two proxy-side fds. ``pump``
is driven by hand until a condition holds (with a deadline).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from lbproxy.proxy.splice import engine_class, make_engine
from lbproxy.proxy.wsframe import close_frame

Engine = engine_class()
pytestmark = pytest.mark.timeout(20)

GOING_AWAY = close_frame(1001, b"backend going away")


def test_engine_is_built() -> None:
    """`make deps` (and pip install) compile the engine; CI must run the native path."""
    assert Engine is not None, "lbproxy/_splice.c was not compiled (is gcc installed?)"


def frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """An unmasked (server -> client) frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x80 | opcode, 127)) + struct.pack("!Q", n)
    return head + payload


def pump_until(engine: object, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Drive ``engine`` (waiting on its epoll fd) until ``cond()`` holds, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        select.select([engine.fileno()], [], [], 0.05)  # type: ignore[attr-defined]
        engine.pump()  # type: ignore[attr-defined]


@dataclass
class Rig:
    engine: object
    client: socket.socket  # the client application's end
    backend: socket.socket  # the backend application's end
    owner: object
    slot: int
    finished: list[tuple[object, str, int, int]] = field(default_factory=list)

    def pump_until(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        pump_until(self.engine, cond, timeout)

    def read(self, sock: socket.socket, n: int) -> bytes:
        got = bytearray()
        sock.setblocking(False)

        def enough() -> bool:
            try:
                chunk = sock.recv(n - len(got))
            except BlockingIOError:
                return False
            if not chunk:
                return True
            got.extend(chunk)
            return len(got) >= n

        self.pump_until(enough)
        return bytes(got)

    def read_to_eof(self, sock: socket.socket) -> bytes:
        got = bytearray()
        sock.setblocking(False)
        done = []

        def eof() -> bool:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                done.append(True)
                return True
            if not chunk:
                return True
            got.extend(chunk)
            return False

        self.pump_until(eof)
        return bytes(got)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of TCP sockets on 127.0.0.1 (resets are real, unlike socketpair)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


@pytest.fixture
def rig() -> Iterator[Callable[..., Rig]]:
    if Engine is None:
        pytest.skip("engine not built")
    made: list[Rig] = []

    def make(ws: bool = True, partial: bytes = b"", skip: int = 0, saw_close: bool = False) -> Rig:
        finished: list[tuple[object, str, int, int]] = []
        engine = make_engine(Engine, lambda *args: finished.append(args))
        client_app, client_proxy = tcp_pair()
        backend_proxy, backend_app = tcp_pair()
        owner = object()
        cfd, bfd = os.dup(client_proxy.fileno()), os.dup(backend_proxy.fileno())
        client_proxy.close()
        backend_proxy.close()
        slot = engine.add(owner, cfd, bfd, ws, partial, skip, saw_close)
        r = Rig(engine, client_app, backend_app, owner, slot, finished)
        made.append(r)
        return r

    yield make
    for r in made:
        r.client.close()
        r.backend.close()


def test_forwards_both_ways_and_counts(rig) -> None:
    r = rig()
    r.client.sendall(b"hello backend")
    assert r.read(r.backend, 13) == b"hello backend"
    msg = frame(b"hi client")
    r.backend.sendall(msg)
    assert r.read(r.client, len(msg)) == msg
    assert r.engine.counts(r.slot, r.owner) == (13, len(msg))
    assert len(r.engine) == 1


def test_half_close_is_passed_on_then_finishes(rig) -> None:
    r = rig(ws=False)
    r.client.sendall(b"last words")
    r.client.shutdown(socket.SHUT_WR)
    assert r.read_to_eof(r.backend) == b"last words"  # the EOF reached the backend
    r.backend.sendall(b"reply after EOF")
    assert r.read(r.client, 15) == b"reply after EOF"
    r.backend.close()
    assert r.read_to_eof(r.client) == b""
    r.pump_until(lambda: bool(r.finished))
    owner, reason, nin, nout = r.finished[0]
    assert owner is r.owner and reason == "client closed" and (nin, nout) == (10, 15)
    assert len(r.engine) == 0


def test_reset_by_backend_closes_the_client(rig) -> None:
    r = rig(ws=False)
    r.backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    r.client.sendall(b"x")
    assert r.read(r.backend, 1) == b"x"
    r.backend.sendall(b"unread")  # RST: the engine reads "unread" first, then the reset
    r.backend.close()
    r.pump_until(lambda: bool(r.finished))
    assert r.finished[0][1].startswith("backend error: [Errno 104]")
    assert r.read_to_eof(r.client) == b"unread"


def test_flow_control_stops_reading_a_client_whose_backend_does_not_read(rig) -> None:
    r = rig(ws=False)
    r.client.setblocking(False)
    sent = 0
    chunk = b"x" * 65536
    deadline = time.monotonic() + 5
    stalled = 0
    while time.monotonic() < deadline and stalled < 20:
        try:
            sent += r.client.send(chunk)
            stalled = 0
        except BlockingIOError:
            stalled += 1
        r.engine.pump()
    nin, _ = r.engine.counts(r.slot, r.owner)
    # what the engine took is bounded: socket buffers + one read held for the backend
    assert 0 < nin < 16 * 1024 * 1024
    assert stalled >= 20  # the client was pushed back
    # the backend starts reading: everything arrives, in order
    got = r.read(r.backend, sent)
    assert len(got) == sent


def test_go_away_at_a_boundary_sends_1001_then_closes_after_the_reply(rig) -> None:
    r = rig()
    msg = frame(b"a" * 300)
    r.backend.sendall(msg)
    assert r.read(r.client, len(msg)) == msg
    r.engine.go_away(r.slot, r.owner)
    assert r.read(r.client, len(GOING_AWAY)) == GOING_AWAY
    assert r.read_to_eof(r.backend) == b""  # the backend side got a FIN
    r.client.sendall(close_frame(1001, mask=b"abcd"))  # the client answers the close
    r.backend.close()
    r.pump_until(lambda: bool(r.finished))
    assert r.read_to_eof(r.client) == b""


def test_go_away_mid_frame_finishes_the_frame_first(rig) -> None:
    r = rig()
    big = frame(os.urandom(70000))  # 64-bit length header
    second = frame(b"never forwarded")
    r.backend.sendall(big[:1000])
    assert r.read(r.client, 1000) == big[:1000]
    r.engine.go_away(r.slot, r.owner)
    r.backend.sendall(big[1000:] + second)
    expected = big[1000:] + GOING_AWAY
    assert r.read(r.client, len(expected)) == expected


def test_go_away_after_the_backend_closing_frame_sends_no_1001(rig) -> None:
    r = rig()
    closing = frame(struct.pack("!H", 1000), opcode=0x8)
    r.backend.sendall(closing)
    assert r.read(r.client, len(closing)) == closing
    r.engine.go_away(r.slot, r.owner)
    r.client.close()
    assert r.read_to_eof(r.backend) == b""
    r.backend.close()
    r.pump_until(lambda: bool(r.finished))


def test_header_split_across_the_handover_is_followed(rig) -> None:
    """The Python tunnel saw the first 2 bytes of a 126-length header; the engine goes on."""
    payload = b"p" * 200
    whole = frame(payload)
    r = rig(partial=whole[:2])
    r.engine.go_away(r.slot, r.owner)  # mid-header: must wait for the frame's end
    r.backend.sendall(whole[2:])
    expected = whole[2:] + GOING_AWAY
    assert r.read(r.client, len(expected)) == expected


def test_close_returns_counts_and_checks_the_owner(rig) -> None:
    r = rig()
    r.client.sendall(b"abc")
    assert r.read(r.backend, 3) == b"abc"
    with pytest.raises(KeyError):
        r.engine.close(r.slot, object())
    assert r.engine.close(r.slot, r.owner) == (3, 0)
    assert len(r.engine) == 0
    assert r.read_to_eof(r.client) == b""
    assert r.read_to_eof(r.backend) == b""
    with pytest.raises(KeyError):
        r.engine.counts(r.slot, r.owner)
    assert r.finished == []  # close() does not report: the caller finishes


# -- native upstream connects (connect / resume / splice / release) -------------------


class Upstreams:
    """An engine with on_data collecting (owner, data, err) reports."""

    def __init__(self) -> None:
        assert Engine is not None
        self.reports: list[tuple[object, bytes | None, int]] = []
        self.finished: list[tuple[object, str, int, int]] = []
        self.engine = make_engine(
            Engine, lambda *a: self.finished.append(a), lambda *a: self.reports.append(a)
        )

    def pump_until(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        pump_until(self.engine, cond, timeout)


@pytest.fixture
def upstreams() -> Upstreams:
    if Engine is None:
        pytest.skip("engine not built")
    return Upstreams()


def test_connect_sends_the_request_and_holds_after_each_report(upstreams: Upstreams) -> None:
    owner = object()
    with socket.create_server(("127.0.0.1", 0)) as server:
        slot = upstreams.engine.connect(owner, "127.0.0.1", server.getsockname()[1], b"GET / x")
        backend, _ = server.accept()
        with backend:
            upstreams.pump_until(lambda: upstreams.engine.connected(slot, owner))
            assert backend.recv(100) == b"GET / x"
            backend.sendall(b"HTTP/1.1 101 ")
            upstreams.pump_until(lambda: bool(upstreams.reports))
            backend.sendall(b"Switching\r\n\r\n")
            time.sleep(0.05)  # (nothing more is read until resume())
            upstreams.engine.pump()
            assert upstreams.reports == [(owner, b"HTTP/1.1 101 ", 0)]
            upstreams.engine.resume(slot, owner)
            upstreams.pump_until(lambda: len(upstreams.reports) == 2)
            assert upstreams.reports[1] == (owner, b"Switching\r\n\r\n", 0)
            # the handshake is done: splice a client in
            client_app, client_proxy = tcp_pair()
            link = object()
            cfd = os.dup(client_proxy.fileno())
            client_proxy.close()
            upstreams.engine.splice(slot, owner, link, cfd, b"101!", b"early", True, b"", 0, False)
            got = Rig(upstreams.engine, client_app, backend, link, slot)
            assert got.read(client_app, 4) == b"101!"
            assert got.read(backend, 5) == b"early"
            backend.sendall(b"\x82\x02hi")
            assert got.read(client_app, 4) == b"\x82\x02hi"
            assert upstreams.engine.counts(slot, link) == (0, 4)
            client_app.close()
            backend.close()
            upstreams.pump_until(lambda: bool(upstreams.finished))
            assert upstreams.finished[0][0] is link


def test_release_hands_over_the_socket_with_what_follows(upstreams: Upstreams) -> None:
    owner = object()
    with socket.create_server(("127.0.0.1", 0)) as server:
        slot = upstreams.engine.connect(owner, "127.0.0.1", server.getsockname()[1], b"GET")
        backend, _ = server.accept()
        with backend:
            upstreams.pump_until(lambda: upstreams.engine.connected(slot, owner))
            backend.recv(10)
            backend.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            upstreams.pump_until(lambda: bool(upstreams.reports))
            backend.sendall(b"rest")
            backend.shutdown(socket.SHUT_WR)
        time.sleep(0.05)
        upstreams.engine.pump()
        assert len(upstreams.reports) == 1  # the EOF stays in the socket for the new owner
        fd = upstreams.engine.release(slot, owner)
        with socket.socket(fileno=fd) as sock:
            sock.settimeout(5)
            assert sock.recv(100) == b"rest" and sock.recv(100) == b""
    assert len(upstreams.engine) == 0


def test_refused_connect_is_reported(upstreams: Upstreams) -> None:
    owner = object()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    upstreams.engine.connect(owner, "127.0.0.1", port, b"GET")
    upstreams.pump_until(lambda: bool(upstreams.reports))
    assert upstreams.reports == [(owner, None, errno.ECONNREFUSED)]
    assert len(upstreams.engine) == 0


def test_connect_wants_an_ip_address(upstreams: Upstreams) -> None:
    with pytest.raises(ValueError):
        upstreams.engine.connect(object(), "localhost", 80, b"GET")
