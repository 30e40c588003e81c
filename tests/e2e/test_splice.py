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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from lbproxy.core.tunnel_rules import close_frame, engine_setup
from lbproxy.core.ws_rules import WsPolicy, engine_ws_setup
from lbproxy.proxy.splice import engine_class, make_engine

Engine = engine_class()
pytestmark = pytest.mark.timeout(20)


def test_engine_is_built() -> None:
    """`make deps` (and pip install) compile the engine; CI must run the native path."""
    assert Engine is not None, "lbproxy/_splice.c was not compiled (is gcc installed?)"


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

    def make(ws: bool = True, close: bytes | None = None) -> Rig:
        finished: list[tuple[object, str, int, int]] = []
        rules, frame_ = engine_setup()
        engine = Engine(
            lambda *args: finished.append(args), rules=rules, close_frame=close or frame_
        )
        client_app, client_proxy = tcp_pair()
        backend_proxy, backend_app = tcp_pair()
        owner = object()
        cfd, bfd = os.dup(client_proxy.fileno()), os.dup(backend_proxy.fileno())
        client_proxy.close()
        backend_proxy.close()
        slot = engine.add(owner, cfd, bfd, ws, b"", 0, False)
        r = Rig(engine, client_app, backend_app, owner, slot, finished)
        made.append(r)
        return r

    yield make
    for r in made:
        r.client.close()
        r.backend.close()


# (forwarding, half-close, resets, flow control and the drain rules are the tunnel
# contract: tests/contract/test_tunnel_contract.py runs them on this engine and on the
# Python tunnel. What follows is the engine's own API.)


def test_the_close_frame_and_the_rules_come_from_python(rig) -> None:
    """The engine sends the close frame it was given at start, not one of its own."""
    r = rig(close=close_frame(1001, b"another frame"))
    r.engine.go_away(r.slot, r.owner)
    other = close_frame(1001, b"another frame")
    assert r.read(r.client, len(other)) == other


def test_the_engine_wants_a_total_rules_table() -> None:
    if Engine is None:
        pytest.skip("engine not built")
    rules, frame_ = engine_setup()
    with pytest.raises(ValueError, match="engine_setup"):
        Engine(print)  # type: ignore[call-arg]  # (no rules of its own to fall back on)
    bad = [
        rules[:-1],  # too short
        bytes([0]) * 8 + rules[8:],  # waits for a boundary even at a boundary
        rules[:8] + bytes([7]) * 6,  # a mode that does not exist
        rules[:1] + bytes([9]) + rules[2:],  # an action that does not exist
    ]
    for table in bad:
        with pytest.raises(ValueError):
            Engine(print, rules=table, close_frame=frame_)
    for size in (1, 128):
        with pytest.raises(ValueError):
            Engine(print, rules=rules, close_frame=b"\x88" * size)
    assert len(Engine(print, rules=rules, close_frame=frame_)) == 0


def test_the_engine_checks_its_websocket_policy() -> None:
    if Engine is None:
        pytest.skip("engine not built")
    rules, frame_ = engine_setup()
    engine = Engine(print, rules=rules, close_frame=frame_)
    params, opcodes, frames, ping = engine_ws_setup(WsPolicy(1.0, 1.0, 100, 0.01, 0.1), b"abcd")
    engine.ws_policy(params, opcodes, frames, ping)  # (what splice.Splicer.set_policy gives)
    bad = [
        (params, opcodes[:-1], frames, ping),  # an opcode table of 15
        (params, opcodes, frames[:-1], ping),  # a frame pair short
        (params, opcodes, (b"x" * 128, *frames[1:]), ping),  # a frame too long
        (params, opcodes, frames, b""),  # no ping
        ((0, 0, 0, 1000, 0), opcodes, frames, ping),  # a rate with no tolerance
    ]
    for args in bad:
        with pytest.raises(ValueError):
            engine.ws_policy(*args)
    assert engine.sweep(time.monotonic_ns()) == []  # (no tunnels: nothing to ping)


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
