"""End to end: health checks, draining, admin token and metrics through a real `lbproxy serve`.

Every test runs `lbproxy serve` and reference backends (`lbproxy backend`) as subprocesses,
talks to them over real sockets and reads the admin API (/api/pools, /metrics) to check
that what lbproxy reports matches what the backends see.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.support import Backend, Lbproxy, free_port, proxy_config, wait_until

pytestmark = pytest.mark.timeout(90)

StartProxy = Callable[[str, int, int], Lbproxy]


# -- fixtures -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared() -> Iterator[list[Backend]]:
    """Two backends for the tests that neither kill them nor count their websockets."""
    started = [Backend(f"b{i}").start() for i in (1, 2)]
    try:
        yield started
    finally:
        for b in started:
            b.stop()


@pytest.fixture
def fresh() -> Iterator[Callable[..., Backend]]:
    """Backends owned by one test (stopped at its end, even if it restarted them)."""
    owned: list[Backend] = []

    def make(backend_id: str, port: int | None = None, start: bool = True) -> Backend:
        backend = Backend(backend_id, port)
        owned.append(backend)
        return backend.start() if start else backend

    yield make
    for backend in owned:
        backend.stop()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    running: list[Lbproxy] = []

    def start(text: str, port: int, admin: int) -> Lbproxy:
        proxy = Lbproxy(text, tmp_path, name=f"lb{len(running)}")
        running.append(proxy)
        return proxy.start(wait_ports=(port, admin))

    yield start
    for proxy in running:
        proxy.stop()


# -- helpers ------------------------------------------------------------------------
def pairs(backends: list[Backend]) -> list[tuple[str, str]]:
    return [(b.id, b.address) for b in backends]


def states(admin: int) -> dict[str, str]:
    pools = httpx.get(f"http://127.0.0.1:{admin}/api/pools", timeout=5).json()["pools"]
    return {b["id"]: b["state"] for b in pools["main"]["backends"]}


def metric(admin: int, name: str, **labels: str) -> float | None:
    """Sum of the samples called ``name`` whose labels include ``labels``; None if none."""
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    found: list[float] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                found.append(float(sample.value))
    return sum(found) if found else None


def value(admin: int, name: str, **labels: str) -> float:
    return metric(admin, name, **labels) or 0.0


def whoami(port: int, client: httpx.Client | None = None) -> str:
    url = f"http://127.0.0.1:{port}/whoami"
    response = client.get(url) if client is not None else httpx.get(url, timeout=5)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def ws_count(backend: Backend) -> int:
    return int(httpx.get(f"http://{backend.address}/whoami", timeout=5).json()["connections"])


def open_ws(port: int, stack: contextlib.ExitStack, n: int) -> list[ClientConnection]:
    return [stack.enter_context(ws_connect(f"ws://127.0.0.1:{port}/echo")) for _ in range(n)]


def lbproxy_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LBPROXY_ADMIN_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


class RequestLoop:
    """New-connection GET /whoami requests in a thread until stopped; records every outcome."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.results: list[str] = []  # backend id, or "error: ..." for a failed request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                response = httpx.get(f"http://127.0.0.1:{self.port}/whoami", timeout=5)
                ok = response.status_code == 200
                self.results.append(response.json()["id"] if ok else f"error: {response}")
            except Exception as exc:  # recorded and asserted on by the test
                self.results.append(f"error: {exc!r}")

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# -- 1. active health checks --------------------------------------------------------
def test_active_http_check_marks_dead_backend_down_and_back_up(fresh, start_proxy) -> None:
    interval, fall, rise = 0.3, 2, 2
    b1, b2 = fresh("b1"), fresh("b2")
    text, port, admin = proxy_config(
        pairs([b1, b2]),
        health={"check": "http", "interval": interval, "fall": fall, "rise": rise},
    )
    start_proxy(text, port, admin)
    wait_until(lambda: {whoami(port) for _ in range(4)} == {"b1", "b2"})
    assert metric(admin, "lbproxy_backend_up", pool="main", backend="b2") == 1.0

    with RequestLoop(port) as during:
        b2.stop()
        killed = time.monotonic()
        wait_until(lambda: states(admin)["b2"] == "down", timeout=fall * interval + 1)
        seen_down = time.monotonic() - killed
        wait_until(lambda: len(during.results) >= 5)
    assert seen_down <= fall * interval + 1
    assert metric(admin, "lbproxy_backend_up", pool="main", backend="b2") == 0.0
    assert states(admin)["b1"] == "up"
    failed = [r for r in during.results if r not in ("b1", "b2")]
    assert not failed, f"{len(failed)} of {len(during.results)} failed: {failed[:3]}"

    after = [whoami(port) for _ in range(50)]
    assert after == ["b1"] * 50

    restarted = fresh("b2", port=b2.port)
    assert restarted.address == b2.address
    wait_until(lambda: states(admin)["b2"] == "up", timeout=rise * interval + 3)
    assert metric(admin, "lbproxy_backend_up", pool="main", backend="b2") == 1.0
    assert value(admin, "lbproxy_health_checks_total", backend="b2", result="fail") >= fall
    wait_until(lambda: "b2" in {whoami(port) for _ in range(4)}, timeout=5)


# -- 2. passive health only ---------------------------------------------------------
def test_passive_failures_mark_unreachable_backend_down(shared, start_proxy) -> None:
    b1 = shared[0]
    dead = ("dead", f"127.0.0.1:{free_port()}")  # nothing listens there
    text, port, admin = proxy_config(
        [(b1.id, b1.address), dead],
        pool={"balance": "round-robin", "retries": 1},
        # a long interval: no passive recovery ("another chance") during the test
        health={"check": "none", "passive_failures": 2, "interval": 60.0},
    )
    start_proxy(text, port, admin)
    refused = {"pool": "main", "backend": "dead", "reason": "connect_refused"}
    served = []
    for _ in range(10):
        served.append(whoami(port))
        if states(admin)["dead"] == "down":
            break
    assert states(admin) == {"b1": "up", "dead": "down"}
    assert served == ["b1"] * len(served)  # every request succeeded through the other one
    errors = value(admin, "lbproxy_upstream_errors_total", **refused)
    assert errors >= 2  # passive_failures failed connects before it was marked down
    assert metric(admin, "lbproxy_backend_up", pool="main", backend="dead") == 0.0
    # once down it is not tried any more
    assert [whoami(port) for _ in range(10)] == ["b1"] * 10
    assert value(admin, "lbproxy_upstream_errors_total", **refused) == errors


# -- 3. metrics agree with reality --------------------------------------------------
def active_metrics(admin: int, backends: list[Backend]) -> dict[str, float]:
    return {
        b.id: value(admin, "lbproxy_connections_active", pool="main", backend=b.id)
        for b in backends
    }


def test_metrics_match_backends(fresh, start_proxy) -> None:
    backends = [fresh("b1"), fresh("b2")]
    text, port, admin = proxy_config(pairs(backends), pool={"balance": "least-connections"})
    start_proxy(text, port, admin)
    made = 0
    with contextlib.ExitStack() as stack:
        open_ws(port, stack, 5)
        made += 5
        real = {b.id: ws_count(b) for b in backends}
        assert sorted(real.values()) == [2, 3]
        wait_until(lambda: active_metrics(admin, backends) == real)
        # the five established websockets are forwarded by the native engine
        assert value(admin, "lbproxy_listener_native_tunnels", listener="public") == 5
    wait_until(lambda: [ws_count(b) for b in backends] == [0, 0])
    wait_until(lambda: active_metrics(admin, backends) == {"b1": 0, "b2": 0})
    wait_until(lambda: value(admin, "lbproxy_listener_native_tunnels", listener="public") == 0)
    assert value(admin, "lbproxy_handshake_seconds_count") >= 5

    # bytes: through one echo websocket, counted when its tunnel closes
    size = 3 * 65536
    before = {
        (b.id, d): value(admin, "lbproxy_bytes_total", backend=b.id, direction=d)
        for b in backends
        for d in ("in", "out")
    }
    with ws_connect(f"ws://127.0.0.1:{port}/echo", max_size=None) as ws:
        made += 1
        (owner,) = [b.id for b in backends if ws_count(b) == 1]
        for _ in range(3):
            payload = os.urandom(65536)
            ws.send(payload)
            assert ws.recv(timeout=10) == payload

    def grew(direction: str) -> bool:
        now = value(admin, "lbproxy_bytes_total", pool="main", backend=owner, direction=direction)
        return now - before[(owner, direction)] >= size

    wait_until(lambda: grew("in") and grew("out"))

    # a malformed request is answered 400 and counted
    rejected = {"listener": "public", "reason": "400"}
    bad_before = value(admin, "lbproxy_rejected_total", **rejected)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        made += 1
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 400")
    wait_until(lambda: value(admin, "lbproxy_rejected_total", **rejected) == bad_before + 1)
    assert value(admin, "lbproxy_connections_total", listener="public") >= made


# -- 4. draining with plain HTTP keep-alive -----------------------------------------
def test_drain_keeps_http_keepalive_clean(shared, start_proxy) -> None:
    text, port, admin = proxy_config(pairs(shared), pool={"balance": "round-robin"})
    start_proxy(text, port, admin)
    url = f"http://127.0.0.1:{admin}"
    total = {"listener": "public"}
    with httpx.Client(timeout=5) as client:
        assert {whoami(port, client) for _ in range(4)} == {"b1", "b2"}
        accepted = value(admin, "lbproxy_connections_total", **total)
        drained = lbproxy_cli("drain", "main", "b1", "--admin", url)
        assert drained.returncode == 0, drained.stderr
        assert [whoami(port, client) for _ in range(10)] == ["b2"] * 10
        # ...all on the same kept-alive client connection
        assert value(admin, "lbproxy_connections_total", **total) == accepted

        status = lbproxy_cli("status", "--admin", url, "--json")
        assert status.returncode == 0, status.stderr
        assert '"draining"' in status.stdout and "b1" in status.stdout
        assert states(admin) == {"b1": "draining", "b2": "up"}

        enabled = lbproxy_cli("enable", "main", "b1", "--admin", url)
        assert enabled.returncode == 0, enabled.stderr
        assert states(admin) == {"b1": "up", "b2": "up"}
        assert {whoami(port, client) for _ in range(4)} == {"b1", "b2"}
        assert value(admin, "lbproxy_connections_total", **total) == accepted


# -- 5. a second SIGTERM exits at once ----------------------------------------------
def test_second_sigterm_exits_without_waiting_for_drain(shared, start_proxy) -> None:
    text, port, admin = proxy_config(pairs(shared), pool={"drain_timeout": 30.0})
    lb = start_proxy(text, port, admin)
    assert lb.proc is not None
    with ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
        ws.send("ping")
        assert ws.recv(timeout=5) == "ping"
        lb.proc.signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in lb.proc.output())  # type: ignore[union-attr]
        assert lb.proc.alive()  # draining: would wait up to drain_timeout = 30 s
        started = time.monotonic()
        lb.proc.signal(signal.SIGTERM)
        assert lb.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 2.5


# -- 6. admin token -----------------------------------------------------------------
def test_admin_token_guards_changes(shared, start_proxy) -> None:
    text, port, admin = proxy_config(pairs(shared))
    text = text.replace("[admin]\n", '[admin]\ntoken = "s3cret"\n', 1)
    start_proxy(text, port, admin)
    url = f"http://127.0.0.1:{admin}"
    drain_url = f"{url}/api/pools/main/backends/b1/drain"
    enable_url = f"{url}/api/pools/main/backends/b1/enable"
    good = {"Authorization": "Bearer s3cret"}

    assert httpx.post(drain_url).status_code == 401
    assert httpx.post(drain_url, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert states(admin)["b1"] == "up"
    assert httpx.post(drain_url, headers=good).status_code == 202
    assert states(admin)["b1"] == "draining"
    assert httpx.post(enable_url).status_code == 401
    assert httpx.post(enable_url, headers=good).status_code == 200
    assert states(admin)["b1"] == "up"

    denied = lbproxy_cli("drain", "main", "b2", "--admin", url)
    assert denied.returncode == 1
    assert "unauthorized" in denied.stderr
    assert states(admin)["b2"] == "up"
    allowed = lbproxy_cli("drain", "main", "b2", "--admin", url, "--token", "s3cret")
    assert allowed.returncode == 0, allowed.stderr
    assert states(admin)["b2"] == "draining"
    assert httpx.get(f"{url}/api/pools").status_code == 200  # reads need no token


# -- 7. slow start ------------------------------------------------------------------
SLOW_START = 3.0


def test_slow_start_ramps_a_backend_that_comes_up(fresh, start_proxy) -> None:
    """A backend that just came up gets far fewer new connections than least-connections
    alone would give it, and its full share once slow_start has passed.

    The ramp is time based, so the bound is computed from what the test observed: the
    backend came up after ``last_down`` (the send time of the last poll that saw it down),
    so during the burst its weight was at most ``(burst_end - last_down) / slow_start``.
    Least-connections picks it only while ``(its + 1) / weight <= other + 1``, which bounds
    its share of the burst even on a slow, loaded machine; plain least-connections would
    give it all ten. Backends present at startup ramp as well, so ``a`` is given
    ``slow_start`` seconds to reach full weight before ``b`` comes up.
    """
    a = fresh("a")
    b = fresh("b", start=False)  # its port is closed: health checks mark it down
    text, port, admin = proxy_config(
        pairs([a, b]),
        pool={"balance": "least-connections", "slow_start": SLOW_START},
        health={"check": "http", "interval": 0.2, "fall": 2, "rise": 2},
    )
    launched = time.monotonic()
    start_proxy(text, port, admin)
    wait_until(lambda: states(admin)["b"] == "down", timeout=5)
    with contextlib.ExitStack() as stack:
        open_ws(port, stack, 20)
        assert ws_count(a) == 20
        # lbproxy ramps every backend from its start too: let a reach its full weight first
        wait_until(lambda: time.monotonic() > launched + SLOW_START, timeout=SLOW_START + 1)
        started = last_down = time.monotonic()
        b.start()
        while True:
            polled = time.monotonic()
            if states(admin)["b"] == "up":
                break
            last_down = polled
            assert polled - started < 15, "b did not come up"
        up_seen = time.monotonic()
        open_ws(port, stack, 10)
        burst_end = time.monotonic()
        on_b = ws_count(b)
        assert ws_count(a) + on_b == 30
        weight = min(1.0, (burst_end - last_down) / SLOW_START)
        bound = max(1, int((20 + 10) * weight))
        assert on_b <= bound, (on_b, burst_end - last_down)
        assert on_b < 10

        # after slow_start: b takes every new connection until it has caught up
        wait_until(lambda: time.monotonic() > up_seen + SLOW_START, timeout=SLOW_START + 1)
        gap = ws_count(a) - ws_count(b)
        open_ws(port, stack, gap)
        assert ws_count(b) == on_b + gap
        assert ws_count(a) == ws_count(b)


# -- 8. plain GETs on new connections are balanced ----------------------------------
def curl_get(port: int, path: str = "/whoami") -> bytes:
    """One curl-shaped GET (no Connection header) on a new connection; the response body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        lengths = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
        length = int(lengths[0].split(b":", 1)[1])
        while len(body) < length:
            chunk = s.recv(65536)
            assert chunk, body
            body += chunk
        return body


@pytest.mark.parametrize("balance", ["round-robin", "least-connections"])
def test_plain_gets_on_new_connections_are_spread(shared, start_proxy, balance: str) -> None:
    """Each request is balanced on its own, whatever path (fast lane or full parser) takes it."""
    text, port, admin = proxy_config(pairs(shared), pool={"balance": balance})
    start_proxy(text, port, admin)
    ids = Counter(json.loads(curl_get(port))["id"] for _ in range(20))
    if balance == "round-robin":
        assert ids == {"b1": 10, "b2": 10}
    else:  # sequential requests: every pick is a tie, and ties rotate
        assert set(ids) == {"b1", "b2"} and min(ids.values()) >= 5, ids
