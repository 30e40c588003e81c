"""Timeouts (README "Proxying"): response_timeout (504, passive failure, a bodiless request or
upgrade retried on another backend), body_timeout (408), keepalive_timeout (an idle client
connection is closed, a busy one is not). Real lbproxy subprocesses against small socket backends;
the response timeout on the native engine's upgrade path and on the Python path (LBPROXY_SPLICE=0).
Also the pure parts (deadlines.py) and the config validation of the four new keys."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lbproxy.proxy.deadlines import (
    AfterTimeout,
    after_response_timeout,
    body_stalled,
    next_body_check,
    sweep_tick,
    untried,
)
from tests.e2e.test_native_upgrade import SWITCH, UPGRADE, read_head
from tests.e2e.test_tunnel import TcpServer
from tests.support import ENGINES, Lbproxy, free_port, lbproxy_cmd, proxy_config
from tests.unit.test_config import problems_of, with_value

pytestmark = pytest.mark.timeout(60)

RESPONSE_TIMEOUT = 0.4
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def read_request(conn: socket.socket, buf: bytearray) -> bytes | None:
    """One request (head and Content-Length body) from ``conn``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    match = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", bytes(buf[:end]))
    end += int(match.group(1)) if match else 0
    while len(buf) < end:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    request = bytes(buf[:end])
    del buf[:end]
    return request


def serve(answer: Callable[[bytes], bytes | None]) -> Callable[[socket.socket], list[bytes]]:
    """A keep-alive backend: ``answer(request)`` for each request (None: close instead);
    a request with "Connection: close" is answered, then the connection is closed."""

    def handler(conn: socket.socket) -> list[bytes]:
        buf = bytearray()
        seen: list[bytes] = []
        while (request := read_request(conn, buf)) is not None:
            seen.append(request)
            reply = answer(request)
            if reply is None:
                break
            conn.sendall(reply)
            if b"\r\nconnection: close\r\n" in request.lower():
                break
        return seen

    return handler


def good_answer(request: bytes) -> bytes:
    if b"Upgrade: websocket" in request:
        return SWITCH
    if request.startswith(b"GET /slow "):
        time.sleep(0.8)
    return OK


def silent(conn: socket.socket) -> None:
    """Accepts, reads the request, never answers (until lbproxy closes)."""
    read_head(conn)
    while conn.recv(4096):
        pass


@dataclass
class Rig:
    engine: str
    admin: int
    alone: int  # listener -> pool "main": only the silent backend
    mixed: int  # listener -> pool "two": a silent and a good backend, retries = 1
    plain: int  # listener -> pool "three": a good backend; short keep-alive and body timeouts

    def errors(self, backend: str, reason: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.admin}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("lbproxy_upstream_errors_total{") and (
                f'backend="{backend}"' in line and f'reason="{reason}"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total


def rig_config(silent_port: int, silent2_port: int, good_port: int) -> tuple[str, Rig]:
    mixed, plain = free_port(), free_port()
    extra = f"""
[listeners.mixed]
bind = "127.0.0.1:{mixed}"
pool = "two"

[listeners.plain]
bind = "127.0.0.1:{plain}"
pool = "three"
keepalive_timeout = 0.4
body_timeout = 0.5

[pools.two]
balance = "round-robin"
retries = 1
response_timeout = {RESPONSE_TIMEOUT}
backends = [
  {{ id = "silent2", address = "127.0.0.1:{silent2_port}" }},
  {{ id = "good", address = "127.0.0.1:{good_port}" }},
]

[pools.two.health]
check = "none"
passive_failures = 1000

[pools.three]
response_timeout = 2.0
backends = [{{ id = "good3", address = "127.0.0.1:{good_port}" }}]

[pools.three.health]
check = "none"
"""
    text, alone, admin = proxy_config(
        [("silent", f"127.0.0.1:{silent_port}")],
        pool={"retries": 2, "response_timeout": RESPONSE_TIMEOUT},
        health={"passive_failures": 2},
        extra=extra,
    )
    return text, Rig("", admin, alone, mixed, plain)


@pytest.fixture(scope="module")
def rigs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Rig]]:
    servers = [TcpServer(silent), TcpServer(silent), TcpServer(serve(good_answer))]
    procs: list[Lbproxy] = []
    made: dict[str, Rig] = {}
    try:
        for engine in ENGINES:
            text, rig = rig_config(*(s.port for s in servers))
            rig.engine = engine
            proc = Lbproxy(text, tmp_path_factory.mktemp(engine), name=engine, engine=engine)
            procs.append(proc)
            proc.start(wait_ports=(rig.alone, rig.mixed, rig.plain, rig.admin))
            made[engine] = rig
        yield made
    finally:
        for proc in procs:
            proc.stop()
        for server in servers:
            server.close()


@pytest.fixture
def rig(rigs: dict[str, Rig], engine: str) -> Rig:
    return rigs[engine]


def ask(port: int, request: bytes) -> tuple[bytes, float]:
    """(the response head, seconds it took)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(request)
        head = read_head(c)
    return head, time.monotonic() - start


GET = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"


def test_silent_backend_is_504_and_a_passive_failure(rig: Rig) -> None:
    for request in (GET, UPGRADE):
        head, took = ask(rig.alone, request)
        assert head.startswith(b"HTTP/1.1 504 "), head
        assert RESPONSE_TIMEOUT * 0.9 <= took < RESPONSE_TIMEOUT + 3.0
    assert rig.errors("silent", "response_timeout") == 2
    # passive_failures = 2: those two marked the backend down
    assert ask(rig.alone, GET)[0].startswith(b"HTTP/1.1 503 ")


def test_bodiless_request_and_upgrade_are_retried_on_a_healthy_backend(rig: Rig) -> None:
    before = rig.errors("silent2", "response_timeout")
    for request, status in ((GET, b"200"), (UPGRADE, b"101")):
        timed_out = rig.errors("silent2", "response_timeout")
        for _ in range(4):  # round-robin: within a few, one goes to the silent backend first
            head, took = ask(rig.mixed, request)
            assert head.startswith(b"HTTP/1.1 " + status + b" "), head
            if rig.errors("silent2", "response_timeout") > timed_out:
                assert took >= RESPONSE_TIMEOUT * 0.9  # it waited, then went elsewhere
                break
        else:
            pytest.fail(f"no {request[:20]!r} ever reached the silent backend")
    assert rig.errors("silent2", "response_timeout") == before + 2


def test_stalled_request_body_is_408(rigs: dict[str, Rig]) -> None:
    rig = rigs["native"]
    request = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nabc"
    head, took = ask(rig.plain, request)
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert 0.45 <= took < 3.0
    with socket.create_connection(("127.0.0.1", rig.plain), timeout=10) as c:
        c.sendall(request[:-3])  # a body that keeps coming, slower than body_timeout in all
        for byte in b"012345":
            time.sleep(0.1)
            c.sendall(bytes((byte,)))
        assert read_head(c).startswith(b"HTTP/1.1 200 ")


def test_keepalive_timeout_closes_an_idle_connection_not_a_busy_one(rigs: dict[str, Rig]) -> None:
    rig = rigs["native"]
    with socket.create_connection(("127.0.0.1", rig.plain), timeout=10) as c:
        c.sendall(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")  # answered after 0.8 s > 0.4 s
        assert read_head(c).startswith(b"HTTP/1.1 200 ")
        c.sendall(GET)
        assert read_head(c).startswith(b"HTTP/1.1 200 ")
        start = time.monotonic()
        assert c.recv(4096) == b""  # idle: closed by lbproxy
        assert 0.3 <= time.monotonic() - start < 3.0


# --- the pure parts -------------------------------------------------------------------------


def test_after_response_timeout() -> None:
    decide = after_response_timeout
    assert decide(answered=False, has_body=False, tried=1, retries=2, others=True) is (
        AfterTimeout.RETRY
    )
    assert decide(answered=False, has_body=False, tried=3, retries=2, others=True) is (
        AfterTimeout.ANSWER
    )
    assert decide(answered=False, has_body=False, tried=1, retries=2, others=False) is (
        AfterTimeout.ANSWER
    )
    assert decide(answered=False, has_body=True, tried=1, retries=2, others=True) is (
        AfterTimeout.ANSWER
    )
    assert decide(answered=True, has_body=False, tried=1, retries=2, others=True) is (
        AfterTimeout.CLOSE
    )


def test_sweep_tick_and_body_checks() -> None:
    assert sweep_tick(3600, 75, 60, 30, 4) == 1.0
    assert sweep_tick(3600, 0.4, 60, 30, 4) == pytest.approx(0.1)
    assert sweep_tick(0.01) == 0.05
    assert not body_stalled(10.4, 10.0, 0.5) and body_stalled(10.5, 10.0, 0.5)
    assert next_body_check(10.0, 10.0, 4.0) == 11.0
    assert next_body_check(13.5, 10.0, 4.0) == 14.0  # never past the deadline
    assert untried([("a", True), ("b", True)], {"a"})
    assert not untried([("a", True), ("b", False)], {"a"})


@pytest.mark.parametrize(
    ("keys", "value"),
    [
        (("listeners", "public", "keepalive_timeout"), 0),
        (("listeners", "public", "body_timeout"), "60"),
        (("pools", "chat", "response_timeout"), -1),
        (("pools", "chat", "upstream_keepalive_timeout"), True),
    ],
)
def test_new_keys_must_be_positive_numbers(keys: tuple[str, ...], value: object) -> None:
    shown = {0: "0", "60": "'60'", -1: "-1", True: "true"}[value]  # type: ignore[index]
    assert problems_of(with_value(keys, value)) == [
        f"conf.toml: {'.'.join(keys)}: must be a positive number, got {shown}"
    ]


def test_check_config_names_a_bad_new_key(tmp_path: Path) -> None:
    text, _, _ = proxy_config([("b1", "127.0.0.1:1")], pool={"response_timeout": 0})
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = subprocess.run(
        lbproxy_cmd("check-config", str(path)), capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert f"{path}: pools.main.response_timeout: must be a positive number, got 0" in out.stderr
