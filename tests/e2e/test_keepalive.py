"""Keep-alive (README "Proxying"): an HTTP/1.0 client's kept connection says so; upstream
connections are closed after upstream_keepalive_timeout (before the backend would); a reused
upstream connection the backend closes without answering is retried on a fresh one (or answered 502)
and is never held against the backend. Real lbproxy subprocesses, small socket backends."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import httpx
import pytest

from lbproxy.config.types import Address
from lbproxy.core.http1 import parse_response_head
from lbproxy.core.pool import Backend
from lbproxy.proxy.context import IdleUpstreams
from tests.e2e.test_native_upgrade import read_head
from tests.e2e.test_timeouts import OK, read_request
from tests.e2e.test_tunnel import TcpServer
from tests.support import Lbproxy, await_until, free_port, proxy_config, wait_until

pytestmark = pytest.mark.timeout(60)

UPSTREAM_KEEPALIVE = 0.5


class Recorder:
    """A keep-alive backend that notes when lbproxy closes each of its connections.

    ``/noclen`` is answered HTTP/1.0 without Content-Length (the body ends at close)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed_at: list[float] = []
        self.server = TcpServer(self.handle)

    def handle(self, conn: socket.socket) -> None:
        buf = bytearray()
        while (request := read_request(conn, buf)) is not None:
            if request.startswith(b"GET /noclen "):
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
                return
            conn.sendall(OK)
            if b"\r\nconnection: close\r\n" in request.lower():
                return
        with self.lock:
            self.closed_at.append(time.monotonic())


def closes_reused(conn: socket.socket) -> None:
    """Answers the first request of a connection; reads the next one and closes unanswered."""
    buf = bytearray()
    if read_request_head(conn, buf) is None:
        return
    conn.sendall(OK)
    read_request_head(conn, buf)


def read_request_head(conn: socket.socket, buf: bytearray) -> bytes | None:
    """The first request of ``buf``/``conn``, its body read only when it came in full."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    if b"Content-Length: 4\r\n" in buf[:end]:
        return read_request(conn, buf)
    head = bytes(buf[:end])
    del buf[:end]
    return head


@dataclass
class Rig:
    recorder: Recorder
    admin: int
    normal: int  # -> pool "main": the recorder, upstream_keepalive_timeout = 0.5
    racy: int  # -> pool "racy": a backend closing every reused connection, passive_failures 1

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.admin}/metrics", timeout=10).text


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    recorder = Recorder()
    racy_backend = TcpServer(closes_reused)
    racy = free_port()
    extra = f"""
[listeners.racy]
bind = "127.0.0.1:{racy}"
pool = "racy"

[pools.racy]
retries = 0
upstream_keepalive_timeout = 30.0
backends = [{{ id = "racy", address = "127.0.0.1:{racy_backend.port}" }}]

[pools.racy.health]
check = "none"
passive_failures = 1
"""
    text, normal, admin = proxy_config(
        [("rec", f"127.0.0.1:{recorder.server.port}")],
        pool={"upstream_keepalive_timeout": UPSTREAM_KEEPALIVE},
        extra=extra,
    )
    proc = Lbproxy(text, tmp_path_factory.mktemp("keepalive"))
    try:
        proc.start(wait_ports=(normal, racy, admin))
        yield Rig(recorder, admin, normal, racy)
    finally:
        proc.stop()
        recorder.server.close()
        racy_backend.close()


def response(conn: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one Content-Length response read from ``conn``."""
    data = read_head(conn)
    parsed = parse_response_head(data, b"GET")
    assert parsed is not None, data
    head, end = parsed
    body = data[end:]
    while len(body) < head.body.length:
        body += conn.recv(65536)
    return data[:end], body


def test_http10_keep_alive_is_kept_and_says_so(rig: Rig) -> None:
    with socket.create_connection(("127.0.0.1", rig.normal), timeout=10) as c:
        for _ in range(2):  # the second request on the same connection works too
            c.sendall(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head, body = response(c)
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"ok"
            assert b"\r\nConnection: keep-alive\r\n" in head


def test_http10_without_keep_alive_is_closed_after_the_response(rig: Rig) -> None:
    with socket.create_connection(("127.0.0.1", rig.normal), timeout=10) as c:
        c.sendall(b"GET /a HTTP/1.0\r\n\r\n")
        head, body = response(c)
        assert body == b"ok" and b"keep-alive" not in head.lower()
        assert c.recv(4096) == b""
    with socket.create_connection(("127.0.0.1", rig.normal), timeout=10) as c:
        c.sendall(b"GET /noclen HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        data = b""
        while chunk := c.recv(4096):  # no length: it can only end with the close
            data += chunk
        assert data.endswith(b"until close") and b"keep-alive" not in data.lower()


def test_idle_upstream_connections_are_closed_after_the_timeout(rig: Rig) -> None:
    recorder = rig.recorder
    with recorder.lock:
        before = len(recorder.closed_at)
    with httpx.Client() as client:
        start = time.monotonic()
        assert client.get(f"http://127.0.0.1:{rig.normal}/x").text == "ok"
        wait_until(lambda: len(recorder.closed_at) > before, timeout=10)
    with recorder.lock:
        idle_for = recorder.closed_at[before] - start
    # closed by lbproxy (the backend never closes on its own), after the timeout and a sweep
    assert UPSTREAM_KEEPALIVE * 0.8 <= idle_for < UPSTREAM_KEEPALIVE + 2.0


def test_reused_connection_closed_by_the_backend_is_retried_not_held_against_it(
    rig: Rig,
) -> None:
    with socket.create_connection(("127.0.0.1", rig.racy), timeout=10) as c:
        requests = [
            b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"POST /3 HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody",
            b"GET /4 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"POST /5 HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody",
        ]
        for request in requests:  # every one after the first meets a closing connection
            c.sendall(request)
            head, body = response(c)
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"ok", (request, head)
    metrics = rig.metrics()
    assert 'lbproxy_backend_up{backend="racy",pool="racy"} 1.0' in metrics
    assert 'backend="racy"' not in "".join(
        line for line in metrics.splitlines() if line.startswith("lbproxy_upstream_errors_total")
    )


def test_reused_connection_closed_before_a_body_it_cannot_resend_is_502_only(rig: Rig) -> None:
    with socket.create_connection(("127.0.0.1", rig.racy), timeout=10) as c:
        c.sendall(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert response(c)[0].startswith(b"HTTP/1.1 200 ")
        # a body that is still coming when the backend closes: lbproxy cannot resend it
        c.sendall(b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab")
        assert read_head(c).startswith(b"HTTP/1.1 502 ")
    assert 'lbproxy_backend_up{backend="racy",pool="racy"} 1.0' in rig.metrics()
    with socket.create_connection(("127.0.0.1", rig.racy), timeout=10) as c:
        c.sendall(b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n")  # still up: served
        assert response(c)[0].startswith(b"HTTP/1.1 200 ")


async def test_idle_upstreams_never_hand_out_a_connection_past_its_age() -> None:
    """In process, real sockets: take() skips (and closes) connections idle for max_age;
    expire() closes exactly those; the most recently idle one is reused first."""
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _r, w: accepted.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    writers = [(await asyncio.open_connection("127.0.0.1", port))[1] for _ in range(3)]
    old, middle, recent = (cast(asyncio.Transport, w.transport) for w in writers)
    backend = Backend("b1", Address("127.0.0.1", port), 1, "static")
    idle = IdleUpstreams()
    assert idle.put(backend, old, 100.0) and idle.put(backend, middle, 102.0)
    assert idle.put(backend, recent, 103.5)
    assert idle.take(backend, 104.0, 4.0) is recent  # most recent first
    assert idle.expire(104.0, 4.0) == 1 and old.is_closing() and not middle.is_closing()
    assert idle.take(backend, 106.5, 4.0) is None  # middle is 4.5 s old: closed, not reused
    assert middle.is_closing() and not recent.is_closing()
    for writer in writers:
        writer.close()
    await await_until(lambda: len(accepted) == 3)
    for writer in accepted:
        writer.close()
    for writer in writers + accepted:
        await writer.wait_closed()
    server.close()
    await server.wait_closed()
