"""SPEC 11 through a real `lbproxy serve` (native engine and Python tunnel) in front of a
real reference backend, with the `websockets` library as the client: it answers the proxy's
pings by itself, a message over max_message gets 1009, and /metrics and the access log
count the messages (the wire-level rules: tests/contract/test_ws_policy_contract.py)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from lbproxy.ops.pool_sync import dump_stats, merge_stats
from lbproxy.ops.stats import Stats
from tests.support import Backend, Lbproxy, proxy_config, wait_until

pytestmark = pytest.mark.timeout(90)

WEBSOCKET = """
[pools.main.websocket]
ping_interval = 0.5
ping_timeout = 1.0
max_message = 65536
max_messages_per_second = 1000
burst = 1000
"""


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    started = Backend("b1").start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def proxy(backend: Backend, tmp_path: Path, engine: str) -> Iterator[tuple[Lbproxy, int, int]]:
    text, port, admin = proxy_config([(backend.id, backend.address)], extra=WEBSOCKET)
    running = Lbproxy(text, tmp_path, engine=engine).start(wait_ports=(port, admin))
    try:
        yield running, port, admin
    finally:
        running.stop()


def metric(admin: int, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_pong_answering_client_stays_and_messages_are_counted(
    proxy: tuple[Lbproxy, int, int],
) -> None:
    running, port, admin = proxy
    # ping_interval=None: the library sends no pings of its own, it only answers lbproxy's
    with ws_connect(f"ws://127.0.0.1:{port}/echo", ping_interval=None) as ws:
        time.sleep(5 * 0.5)  # 5 x ping_interval of idleness, over ping_interval + ping_timeout
        for i in range(10):
            ws.send(f"message {i}")
            assert ws.recv(timeout=5) == f"message {i}"
    wait_until(lambda: metric(admin, "lbproxy_ws_closes_total", reason="client") == 1, 10)
    assert metric(admin, "lbproxy_ws_messages_total", direction="in", backend="b1") == 10
    assert metric(admin, "lbproxy_ws_messages_total", direction="out", backend="b1") == 10
    assert metric(admin, "lbproxy_ws_closes_total", reason="dead_peer") == 0
    assert running.proc is not None
    wait_until(lambda: re.search(r"msgs_in=10 msgs_out=10", running.proc.output()), 10)  # type: ignore[union-attr]


def test_a_message_over_max_message_gets_1009(proxy: tuple[Lbproxy, int, int]) -> None:
    _, port, admin = proxy
    with ws_connect(f"ws://127.0.0.1:{port}/echo", max_size=None) as ws:
        ws.send(b"small")
        assert ws.recv(timeout=5) == b"small"
        ws.send(b"x" * 100_000)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    wait_until(lambda: metric(admin, "lbproxy_ws_closes_total", reason="message_too_big") == 1, 10)
    assert metric(admin, "lbproxy_ws_messages_total", direction="in") == 1


def test_worker_counts_are_summed_by_the_supervisor() -> None:
    parts = []
    for n in (2, 3):
        stats = Stats()
        stats.ws_messages[("p", "b", "in")] += n
        stats.ws_closes[("p", "dead_peer")] += 1
        parts.append(dump_stats(stats))
    merged = merge_stats(parts)
    assert merged.ws_messages[("p", "b", "in")] == 5
    assert merged.ws_closes[("p", "dead_peer")] == 2
