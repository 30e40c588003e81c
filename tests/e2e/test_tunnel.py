"""Integration: the byte tunnel (flow control, half-close, PROXY protocol) in tcp and http mode."""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Backend, Lbproxy, rss_kib, wait_until
from tests.support.config import proxy_config

pytestmark = pytest.mark.timeout(90)


class TcpServer:
    """A tiny threaded TCP server: runs ``handler(conn)`` per connection."""

    def __init__(self, handler) -> None:  # type: ignore[no-untyped-def]
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.results: list[object] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.results.append(self.handler(conn))
            except OSError as exc:
                self.results.append(exc)

    def close(self) -> None:
        self.sock.close()


def read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(params=["native", "python"])
def proxy(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """Starts lbproxy with the native tunnel engine, and with the Python tunnel."""
    running: list[Lbproxy] = []
    env = {"LBPROXY_SPLICE": "0"} if request.param == "python" else None

    def start(text: str, port: int) -> Lbproxy:
        p = Lbproxy(text, tmp_path, name=f"lb{len(running)}", env=env).start(wait_ports=(port,))
        running.append(p)
        return p

    yield start
    for p in running:
        p.stop()


def test_tcp_half_close_is_passed_on(proxy) -> None:
    def reverse_after_eof(conn: socket.socket) -> bytes:
        data = read_all(conn)  # until the client's FIN arrives through the proxy
        conn.sendall(data[::-1])
        return data

    server = TcpServer(reverse_after_eof)
    text, port, _ = proxy_config([("t", f"127.0.0.1:{server.port}")], mode="tcp")
    proxy(text, port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"hello world")
        c.shutdown(socket.SHUT_WR)
        assert read_all(c) == b"dlrow olleh"
    server.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header_reaches_backend(proxy, version: str) -> None:
    def grab(conn: socket.socket) -> bytes:
        data = b""
        while b"payload" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(b"ok")
        return data

    server = TcpServer(grab)
    text, port, _ = proxy_config(
        [("t", f"127.0.0.1:{server.port}")], mode="tcp", listener={"proxy_protocol": version}
    )
    proxy(text, port)
    with socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=("127.0.0.7", 0)
    ) as c:
        src_port = c.getsockname()[1]
        c.sendall(b"payload")
        assert c.recv(10) == b"ok"

    # (the readiness probe of the proxy port made an earlier, empty connection)
    def received() -> bytes | None:
        return next(
            (r for r in server.results if isinstance(r, bytes) and r.endswith(b"payload")), None
        )

    data = wait_until(received)
    assert isinstance(data, bytes)
    if version == "v1":
        assert data == f"PROXY TCP4 127.0.0.7 127.0.0.1 {src_port} {port}\r\npayload".encode()
    else:
        assert data[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
        assert data[16:20] == bytes([127, 0, 0, 7])
        assert struct.unpack("!HH", data[24:28]) == (src_port, port)
        assert data[28:] == b"payload"
    server.close()


def ws_handshake(port: int, path: str = "/echo") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def masked_frame(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = b"\x82" + bytes((0x80 | 127,)) + struct.pack("!Q", n)
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(mask * (n // 4), "big")).to_bytes(
        n, "big"
    )
    return head + mask + body


def test_slow_reader_does_not_grow_proxy_memory(proxy) -> None:
    backend = Backend("slow").start()
    try:
        text, port, _ = proxy_config([("slow", backend.address)])
        lb = proxy(text, port)
        warm = ws_handshake(port)
        warm.close()
        before = rss_kib(lb.pid)
        s = ws_handshake(port)
        frame = masked_frame(os.urandom(1 << 20))
        s.settimeout(3.0)
        sent = 0
        try:
            while sent < 300 << 20:  # a client that sends but never reads its echoes
                s.sendall(frame)
                sent += len(frame)
        except (TimeoutError, OSError):
            pass
        grown = rss_kib(lb.pid) - before
        # flow control stopped the client long before 300 MB, and lbproxy buffered little
        assert sent < 300 << 20
        assert grown < 40 * 1024, f"lbproxy grew {grown} KiB after {sent >> 20} MiB sent"
        s.close()
    finally:
        backend.stop()
