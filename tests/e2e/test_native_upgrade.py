"""Integration: websocket upgrades whose backend side the native engine connects
(native_upgrade.py), against raw TCP backends that answer in awkward ways. Every test
runs with the engine and with the Python path (LBPROXY_SPLICE=0): same behaviour."""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lbproxy.core.wsframe import close_frame
from tests.e2e.test_tunnel import TcpServer
from tests.support import Lbproxy, free_port, proxy_config, wait_until

pytestmark = pytest.mark.timeout(60)

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + base64.b64encode(b"0123456789abcdef") + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: x\r\n\r\n"
)


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def read_n(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def masked(payload: bytes, opcode: int = 0x2) -> bytes:
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + body


def unmask(frame: bytes) -> bytes:
    n = frame[1] & 0x7F
    key = frame[2:6]
    return bytes(b ^ key[i % 4] for i, b in enumerate(frame[6 : 6 + n]))


def echo_after(head_chunks: list[bytes], pause: float = 0.0):  # type: ignore[no-untyped-def]
    """A backend that reads the upgrade, answers with ``head_chunks`` (pausing between
    them), then echoes one masked frame back unmasked."""

    def handler(conn: socket.socket) -> bytes:
        request = read_head(conn)
        for i, chunk in enumerate(head_chunks):
            if i and pause:
                time.sleep(pause)
            conn.sendall(chunk)
        frame = read_n(conn, 2)
        n = frame[1] & 0x7F
        frame += read_n(conn, 4 + n)
        payload = unmask(frame)
        conn.sendall(bytes((0x82, len(payload))) + payload)
        return request

    return handler


@pytest.fixture
def lb(tmp_path: Path, engine: str) -> Iterator[object]:
    running: list[Lbproxy] = []

    def start(backends: list[tuple[str, str]], **pool: object) -> int:
        text, port, _ = proxy_config(backends, pool={"balance": "round-robin", **pool})
        proxy = Lbproxy(text, tmp_path, name=f"lb{len(running)}", engine=engine)
        running.append(proxy)
        proxy.start(wait_ports=(port,))
        return port

    yield start
    for proxy in running:
        proxy.stop()


def ws_roundtrip(port: int, early: bytes = b"") -> tuple[bytes, bytes]:
    """Upgrade through lbproxy, send one frame; (the 101 head, the echoed frame)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        payload = b"hello through the tunnel"
        c.sendall(UPGRADE + (masked(payload) if early else b""))
        head = read_head(c)
        rest = head[head.index(b"\r\n\r\n") + 4 :]
        head = head[: head.index(b"\r\n\r\n") + 4]
        if not early:
            c.sendall(masked(payload))
        echoed = rest + read_n(c, 2 + len(payload) - len(rest))
        return head, echoed


def test_101_in_pieces_then_echo(lb) -> None:
    server = TcpServer(echo_after([SWITCH[:20], SWITCH[20:50], SWITCH[50:]], pause=0.05))
    port = lb([("b1", f"127.0.0.1:{server.port}")])
    head, echoed = ws_roundtrip(port)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert echoed == bytes((0x82, 24)) + b"hello through the tunnel"
    wait_until(lambda: server.results)  # (the handler records the request after its echo)
    request = server.results[0]
    assert isinstance(request, bytes) and b"X-Forwarded-For: 127.0.0.1\r\n" in request
    server.close()


def test_frame_sent_before_the_101_reaches_the_backend(lb) -> None:
    server = TcpServer(echo_after([SWITCH], pause=0.0))
    port = lb([("b1", f"127.0.0.1:{server.port}")])
    _, echoed = ws_roundtrip(port, early=b"yes")
    assert echoed == bytes((0x82, 24)) + b"hello through the tunnel"
    server.close()


def test_101_with_the_first_frame_in_the_same_packet(lb) -> None:
    def handler(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(SWITCH + bytes((0x81, 5)) + b"hello")
        read_n(conn, 6 + 2)  # the client's close frame
        conn.sendall(close_frame(1000))

    server = TcpServer(handler)
    port = lb([("b1", f"127.0.0.1:{server.port}")])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(UPGRADE)
        data = b""
        while not data.endswith(b"hello"):
            data += c.recv(4096)
        assert data.startswith(b"HTTP/1.1 101 ") and data.endswith(b"\r\n\r\n\x81\x05hello")
        c.sendall(masked(b"\x03\xe8", opcode=0x8))
        assert read_n(c, 4) == close_frame(1000)
    server.close()


def test_refused_upgrade_is_answered_with_the_backend_response(lb) -> None:
    """A 403 with a body, the backend closing right behind it: the client gets it whole."""

    def handler(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndenied"
        )

    server = TcpServer(handler)
    port = lb([("b1", f"127.0.0.1:{server.port}")])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(UPGRADE)
        data = b""
        while chunk := c.recv(4096):
            data += chunk
            if data.endswith(b"denied"):
                break
    assert data.startswith(b"HTTP/1.1 403 Forbidden\r\n") and data.endswith(b"\r\n\r\ndenied")
    server.close()


def test_backend_closing_without_an_answer_is_retried_elsewhere(lb) -> None:
    def hang_up(conn: socket.socket) -> None:
        read_head(conn)

    bad = TcpServer(hang_up)
    good = TcpServer(echo_after([SWITCH]))
    dead = free_port()  # refused
    port = lb(
        [
            ("dead", f"127.0.0.1:{dead}"),
            ("bad", f"127.0.0.1:{bad.port}"),
            ("good", f"127.0.0.1:{good.port}"),
        ],
        retries=2,
    )
    for _ in range(3):  # round-robin starts anywhere: every order ends on "good"
        head, echoed = ws_roundtrip(port)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert echoed.endswith(b"hello through the tunnel")
    bad.close()
    good.close()


def test_all_backends_failing_gives_502(lb) -> None:
    port = lb([("d1", f"127.0.0.1:{free_port()}"), ("d2", f"127.0.0.1:{free_port()}")])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(UPGRADE)
        assert read_head(c).startswith(b"HTTP/1.1 502 ")


def test_backend_by_host_name(lb) -> None:
    """A backend given by name (not an IP): the engine cannot connect it, Python does."""
    server = TcpServer(echo_after([SWITCH]))
    port = lb([("b1", f"localhost:{server.port}")])
    head, echoed = ws_roundtrip(port)
    assert head.startswith(b"HTTP/1.1 101 ") and echoed.endswith(b"tunnel")
    server.close()


FD_LIMIT = 64


def test_out_of_fds_is_503_and_not_held_against_the_backend(tmp_path: Path, engine: str) -> None:
    """lbproxy under a 64-fd limit: upgrades until a backend socket cannot be made. That one
    is answered 503, the backend stays up (no passive failure), and once fds are free again
    the next upgrade works."""

    def hold(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(SWITCH)
        while conn.recv(4096):
            pass

    server = TcpServer(hold)
    text, port, admin = proxy_config([("b1", f"127.0.0.1:{server.port}")])
    prlimit = ("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}")
    proc = Lbproxy(text, tmp_path, engine=engine, prefix=prlimit).start(wait_ports=(port, admin))
    held: list[socket.socket] = []
    try:
        fds = lambda: len(os.listdir(f"/proc/{proc.pid}/fd"))  # noqa: E731
        saw_503 = False
        for _ in range(80):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(UPGRADE)
            try:
                head = read_head(c)
            except OSError:
                head = b""
            if head.startswith(b"HTTP/1.1 101 "):
                held.append(c)
                continue
            c.close()
            if head.startswith(b"HTTP/1.1 503 "):
                saw_503 = True
                break
            # the accept itself found no fd: free one websocket (2 fds), then take fds back
            # with idle admin connections until one is left, so the next accept gets the last
            # fd and the backend socket is the one that cannot be made. (Absolute counts: the
            # event loop may give up or take back a spare fd of its own around an EMFILE.)
            assert head == b"", head
            held.pop().close()
            wait_until(lambda: fds() <= FD_LIMIT - 2)
            while (count := fds()) < FD_LIMIT - 1:
                held.append(socket.create_connection(("127.0.0.1", admin), timeout=10))
                wait_until(lambda c=count: fds() > c)
        assert saw_503
        for c in held:
            c.close()
        held.clear()
        wait_until(lambda: fds() < 40)
        metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
        assert 'lbproxy_backend_up{backend="b1",pool="main"} 1.0' in metrics
        assert 'reason="local_resources"' in metrics
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(UPGRADE)  # fds free again: the next upgrade works
            assert read_head(c).startswith(b"HTTP/1.1 101 ")
    finally:
        for c in held:
            c.close()
        proc.stop()
        server.close()


def test_backend_that_never_completes_the_connect_is_retried_elsewhere(lb) -> None:
    """connect_timeout (on the engine: a sweep deadline, no timer per connection): a backend
    whose accept queue is full drops the SYN, so the connect hangs; the upgrade goes to
    the other backend after connect_timeout, and works."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)  # never accepted: one queued connection fills it
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(hole.getsockname())
        fillers.append(f)
    good = TcpServer(echo_after([SWITCH]))
    port = lb(
        [("hole", f"127.0.0.1:{hole.getsockname()[1]}"), ("good", f"127.0.0.1:{good.port}")],
        retries=1,
        connect_timeout=0.5,
    )
    for _ in range(2):  # round-robin starts anywhere: one of the two tries the hole first
        start = time.monotonic()
        head, echoed = ws_roundtrip(port)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert echoed.endswith(b"hello through the tunnel")
        assert time.monotonic() - start < 8.0
    for f in fillers:
        f.close()
    hole.close()
    good.close()
