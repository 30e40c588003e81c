"""Integration: real `lbproxy serve` subprocesses in front of real reference backends."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.support import Backend, Lbproxy, engine_env, free_port, proxy_config, wait_until

pytestmark = pytest.mark.timeout(90)


def pairs(backends: list[Backend]) -> list[tuple[str, str]]:
    return [(b.id, b.address) for b in backends]


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[object]:
    running: list[Lbproxy] = []

    def start(text: str, port: int, *extra: str, env: dict[str, str] | None = None) -> Lbproxy:
        proxy = Lbproxy(text, tmp_path, *extra, name=f"lb{len(running)}", env=env)
        running.append(proxy)
        return proxy.start(wait_ports=(port,))

    yield start
    for proxy in running:
        proxy.stop()


def whoami(port: int, **kwargs: object) -> str:
    response = httpx.get(f"http://127.0.0.1:{port}/whoami", timeout=5, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200
    return str(response.json()["id"])


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_websocket_echo_text_and_binary(backends, start_proxy, loop: str, engine: str) -> None:
    """Both event loops, with the native tunnel engine and with the Python tunnel."""
    text, port, _ = proxy_config(pairs(backends))
    env = {"LBPROXY_LOOP": loop, **engine_env(engine)}
    start_proxy(text, port, env=env)
    with ws_connect(f"ws://127.0.0.1:{port}/echo", max_size=None) as ws:
        for size in (1, 125, 126, 65535, 65536, 1 << 20):
            payload = os.urandom(size)
            ws.send(payload)
            assert ws.recv(timeout=10) == payload
            message = "é" * (size // 2 or 1)
            ws.send(message)
            assert ws.recv(timeout=10) == message


def test_least_connections_spreads_websockets(backends, start_proxy) -> None:
    text, port, _ = proxy_config(pairs(backends), pool={"balance": "least-connections"})
    start_proxy(text, port)
    with contextlib.ExitStack() as stack:
        for _ in range(30):
            stack.enter_context(ws_connect(f"ws://127.0.0.1:{port}/echo"))
        counts = {
            b.id: json.loads(httpx.get(f"http://{b.address}/whoami").text)["connections"]
            for b in backends
        }
        assert counts == {"b1": 10, "b2": 10, "b3": 10}


def test_round_robin_and_plain_http_keepalive(backends, start_proxy) -> None:
    text, port, _ = proxy_config(pairs(backends), pool={"balance": "round-robin"})
    start_proxy(text, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        ids = [client.get("/whoami").json()["id"] for _ in range(9)]
        # one client connection, every request routed on its own
        assert Counter(ids) == {"b1": 3, "b2": 3, "b3": 3}
        big = client.get("/slow", params={"bytes": 300000})
        assert big.status_code == 200 and len(big.content) == 300000
        assert big.headers.get("transfer-encoding") == "chunked"
        body = os.urandom(200000)
        echoed = client.post("/echo-body", content=body)
        assert echoed.content == body
        chunked = client.post("/echo-body", content=iter([b"abc", b"defgh", os.urandom(70000)]))
        assert chunked.status_code == 200 and len(chunked.content) == 8 + 70000
        assert client.get("/nope").status_code == 404


def test_forwarded_headers(backends, start_proxy) -> None:
    text, port, _ = proxy_config(pairs(backends))
    start_proxy(text, port)
    response = httpx.get(
        f"http://127.0.0.1:{port}/headers",
        headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "gopher"},
    )
    headers = {k.lower(): v for k, v in response.json()}
    assert headers["x-forwarded-for"] == "127.0.0.1"  # untrusted client: incoming value dropped
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-port"] == str(port)


def test_trusted_proxy_keeps_xff(backends, start_proxy) -> None:
    text, port, _ = proxy_config(pairs(backends), listener={"trusted_proxies": ["127.0.0.0/8"]})
    start_proxy(text, port)
    response = httpx.get(f"http://127.0.0.1:{port}/headers", headers={"X-Forwarded-For": "6.6.6.6"})
    headers = {k.lower(): v for k, v in response.json()}
    assert headers["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"


def test_cookie_affinity_sets_cookie_on_101(backends, start_proxy) -> None:
    text, port, _ = proxy_config(
        pairs(backends),
        pool={
            "balance": "hash",
            "hash_key": "cookie:lbid",
            "sticky_cookie": True,
            "hash_balance_factor": 0,
        },
    )
    start_proxy(text, port)
    with ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
        set_cookie = ws.response.headers.get("Set-Cookie")
    assert set_cookie is not None and set_cookie.startswith("lbid=")
    cookie = set_cookie.split(";")[0]
    first = whoami(port, headers={"Cookie": cookie})
    for _ in range(10):
        assert whoami(port, headers={"Cookie": cookie}) == first
        with ws_connect(f"ws://127.0.0.1:{port}/echo", additional_headers={"Cookie": cookie}) as ws:
            assert ws.response.headers.get("Set-Cookie") is None
            owner = [
                b.id
                for b in backends
                if httpx.get(f"http://{b.address}/whoami").json()["connections"] == 1
            ]
            assert owner == [first]
    # different keys spread over the backends
    seen = {whoami(port, headers={"Cookie": f"lbid=user{i}"}) for i in range(40)}
    assert seen == {"b1", "b2", "b3"}


def test_two_instances_agree_on_hash_keys(backends, start_proxy) -> None:
    pool = {"balance": "hash", "hash_key": "header:x-user", "hash_balance_factor": 0}
    text1, port1, _ = proxy_config(pairs(backends), pool=pool)
    text2, port2, _ = proxy_config(list(reversed(pairs(backends))), pool=pool)
    start_proxy(text1, port1)
    start_proxy(text2, port2)
    with httpx.Client() as c1, httpx.Client() as c2:
        for i in range(60):
            h = {"X-User": f"user-{i}"}
            a = c1.get(f"http://127.0.0.1:{port1}/whoami", headers=h).json()["id"]
            b = c2.get(f"http://127.0.0.1:{port2}/whoami", headers=h).json()["id"]
            assert a == b


def raw_request(port: int, data: bytes, src: str = "127.0.0.1", read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0)) as s:
        s.sendall(data)
        if not read:
            return b""
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_tcp_mode_affinity_by_source_ip(backends, start_proxy) -> None:
    text, port, _ = proxy_config(
        pairs(backends),
        mode="tcp",
        pool={"balance": "hash", "hash_key": "ip", "hash_balance_factor": 0},
    )
    start_proxy(text, port)
    request = b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    owners: dict[str, str] = {}
    for i in range(2, 40):
        src = f"127.0.0.{i}"
        body = raw_request(port, request, src).split(b"\r\n\r\n", 1)[1]
        owners[src] = json.loads(body)["id"]
    assert set(owners.values()) == {"b1", "b2", "b3"}
    for src, owner in list(owners.items())[:10]:
        body = raw_request(port, request, src).split(b"\r\n\r\n", 1)[1]
        assert json.loads(body)["id"] == owner


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:100]
    return int(response[9:12])


def test_error_statuses(backends, start_proxy) -> None:
    text, port, _ = proxy_config(pairs(backends), listener={"handshake_timeout": 0.5})
    start_proxy(text, port)
    assert status_of(raw_request(port, b"NOT HTTP AT ALL\r\n\r\n")) == 400
    smuggle = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert status_of(raw_request(port, smuggle)) == 400
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    assert status_of(raw_request(port, huge)) == 431
    # slow head: half a request, then nothing -> 408 after handshake_timeout
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        data = s.recv(65536)
        assert status_of(data) == 408
    # another client was unaffected meanwhile
    assert whoami(port) in {"b1", "b2", "b3"}


def test_502_when_backends_unreachable_and_503_when_none_up(start_proxy) -> None:
    dead = [("d1", f"127.0.0.1:{free_port()}"), ("d2", f"127.0.0.1:{free_port()}")]
    text, port, _ = proxy_config(
        dead, pool={"retries": 1, "connect_timeout": 1.0}, health={"passive_failures": 0}
    )
    start_proxy(text, port)
    assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 502
    # passive health marks them down; then nothing is up -> 503
    text, port, _ = proxy_config(dead, pool={"retries": 1}, health={"passive_failures": 1})
    start_proxy(text, port)
    assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 502
    assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 503


def test_retries_past_a_dead_backend(backends, start_proxy) -> None:
    servers = [("dead", f"127.0.0.1:{free_port()}"), *pairs(backends)[:1]]
    text, port, _ = proxy_config(
        servers, pool={"balance": "round-robin", "retries": 2}, health={"passive_failures": 0}
    )
    start_proxy(text, port)
    for _ in range(10):
        assert whoami(port) == "b1"
        with ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
            ws.send("x")
            assert ws.recv(timeout=5) == "x"


def test_max_connections(backends, start_proxy) -> None:
    text, port, _ = proxy_config(pairs(backends), listener={"max_connections": 2})
    start_proxy(text, port)
    with contextlib.ExitStack() as stack:
        for _ in range(2):
            stack.enter_context(ws_connect(f"ws://127.0.0.1:{port}/echo"))
        assert status_of(raw_request(port, b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")) == 503
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/whoami").status_code == 200)


def test_idle_timeout_closes_quiet_tunnels(backends, start_proxy) -> None:
    text, port, _ = proxy_config(pairs(backends), listener={"idle_timeout": 0.5})
    start_proxy(text, port)
    with ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
        with pytest.raises(Exception):  # noqa: B017 - closed by the proxy, any close error
            ws.recv(timeout=5)


@pytest.mark.parametrize(
    "connection", [b"Upgrade", b"keep-alive, Upgrade"], ids=["fast-lane", "full-parser"]
)
def test_upgrade_shapes_take_either_path(backends, start_proxy, connection: bytes) -> None:
    import base64

    text, port, _ = proxy_config(pairs(backends))
    start_proxy(text, port)
    key = base64.b64encode(os.urandom(16))
    request = (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: " + connection
        + b"\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101")
        s.sendall(b"\x81\x82abcd" + bytes(b ^ m for b, m in zip(b"hi", b"ab", strict=True)))
        assert s.recv(4) == b"\x81\x02hi"


def test_backend_that_accepts_then_resets_counts_as_passive_failure(backends, start_proxy) -> None:
    """A backend that accepts and closes at once: the request goes elsewhere, and it is marked."""
    from tests.e2e.test_tunnel import TcpServer

    def slam(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    bad = TcpServer(slam)  # closes with a reset right after accepting
    try:
        text, port, admin = proxy_config(
            [("bad", f"127.0.0.1:{bad.port}"), *pairs(backends)[:1]],
            pool={"balance": "round-robin", "retries": 1},
            health={"passive_failures": 2},
        )
        start_proxy(text, port)
        for _ in range(6):  # every request is answered, by b1
            assert whoami(port) == "b1"
        pools = httpx.get(f"http://127.0.0.1:{admin}/api/pools").json()["pools"]
        states = {b["id"]: b["state"] for b in pools["main"]["backends"]}
        assert states["bad"] == "down"
    finally:
        bad.close()


def test_http10_client_never_gets_a_chunked_response(backends, start_proxy) -> None:
    text, port, _ = proxy_config(pairs(backends))
    start_proxy(text, port)
    response = raw_request(port, b"GET /slow?bytes=5000 HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert status_of(head) == 200
    assert b"chunked" not in head.lower()
    assert len(body) == 5000  # the whole body, delimited by length or by the close


def test_half_a_head_then_eof_gets_400_at_once(backends, start_proxy) -> None:
    text, port, _ = proxy_config(pairs(backends), listener={"handshake_timeout": 30.0})
    start_proxy(text, port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        s.shutdown(socket.SHUT_WR)
        assert status_of(s.recv(65536)) == 400  # well before handshake_timeout
