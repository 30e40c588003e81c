"""Integration: draining (admin API), SIGTERM, SIGHUP reload with websockets open."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.support import Backend, Lbproxy, proxy_config, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def backends() -> Iterator[list[Backend]]:
    started = [Backend(f"b{i}").start() for i in range(1, 3)]
    try:
        yield started
    finally:
        for b in started:
            b.stop()


def ws_count(backend: Backend) -> int:
    return int(httpx.get(f"http://{backend.address}/whoami").json()["connections"])


def open_on(
    port: int, backends: list[Backend], stack: contextlib.ExitStack, n: int
) -> dict[str, list[ClientConnection]]:
    """Open n websockets one by one and note which backend each landed on."""
    placed: dict[str, list[ClientConnection]] = {b.id: [] for b in backends}
    for _ in range(n):
        before = {b.id: ws_count(b) for b in backends}
        ws = stack.enter_context(ws_connect(f"ws://127.0.0.1:{port}/echo"))
        after = {b.id: ws_count(b) for b in backends}
        (owner,) = [i for i in after if after[i] == before[i] + 1]
        placed[owner].append(ws)
    return placed


def close_code(ws: ClientConnection, timeout: float) -> int | None:
    try:
        ws.recv(timeout=timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    return -1


def echoes(ws: ClientConnection) -> bool:
    ws.send("ping")
    return ws.recv(timeout=5) == "ping"


def test_admin_drain_sends_1001_after_drain_timeout(backends, tmp_path: Path, engine: str) -> None:
    text, port, admin = proxy_config(
        [(b.id, b.address) for b in backends],
        pool={"drain_timeout": 1.0, "close_spread": 0.5},
    )
    lb = Lbproxy(text, tmp_path, engine=engine).start(wait_ports=(port, admin))
    try:
        with contextlib.ExitStack() as stack:
            placed = open_on(port, backends, stack, 4)
            assert len(placed["b1"]) == 2 and len(placed["b2"]) == 2
            started = time.monotonic()
            r = httpx.post(f"http://127.0.0.1:{admin}/api/pools/main/backends/b1/drain")
            assert r.status_code == 202
            # new connections avoid the draining backend at once
            for _ in range(3):
                assert httpx.get(f"http://127.0.0.1:{port}/whoami").json()["id"] == "b2"
            # open ones keep working until drain_timeout...
            assert all(echoes(ws) for ws in placed["b1"])
            # ...then get a clean 1001 Going Away
            codes = [close_code(ws, timeout=5) for ws in placed["b1"]]
            assert codes == [1001, 1001]
            assert time.monotonic() - started >= 0.9
            # the other backend's clients are untouched
            assert all(echoes(ws) for ws in placed["b2"])
            wait_until(lambda: ws_count(backends[0]) == 0)
            pools = httpx.get(f"http://127.0.0.1:{admin}/api/pools").json()["pools"]
            states = {b["id"]: b["state"] for b in pools["main"]["backends"]}
            assert states == {"b1": "draining", "b2": "up"}
            r = httpx.post(f"http://127.0.0.1:{admin}/api/pools/main/backends/b1/enable")
            assert r.status_code == 200
    finally:
        lb.stop()


def test_sigterm_drains_with_1001_and_exits_0(backends, tmp_path: Path, engine: str) -> None:
    text, port, _ = proxy_config(
        [(b.id, b.address) for b in backends], pool={"drain_timeout": 0.5, "close_spread": 0.5}
    )
    lb = Lbproxy(text, tmp_path, engine=engine).start(wait_ports=(port,))
    try:
        with contextlib.ExitStack() as stack:
            sockets = [
                stack.enter_context(ws_connect(f"ws://127.0.0.1:{port}/echo")) for _ in range(4)
            ]
            assert all(echoes(ws) for ws in sockets)
            assert lb.proc is not None
            started = time.monotonic()
            lb.proc.signal(signal.SIGTERM)
            codes = [close_code(ws, timeout=5) for ws in sockets]
            assert codes == [1001] * 4
            assert lb.proc.wait(timeout=10) == 0
            assert time.monotonic() - started < 0.5 + 0.5 + 5
    finally:
        lb.stop()


def test_sighup_reload_adds_and_removes_backends(backends, tmp_path: Path) -> None:
    b1, b2 = backends
    text, port, admin = proxy_config(
        [(b1.id, b1.address)], pool={"drain_timeout": 1.0, "close_spread": 0.2}
    )
    lb = Lbproxy(text, tmp_path).start(wait_ports=(port,))
    assert lb.proc is not None
    try:
        with ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
            assert echoes(ws)
            assert ws_count(b1) == 1
            new_text, _, _ = proxy_config(
                [(b2.id, b2.address)],
                port=port,
                admin_port=admin,
                pool={"drain_timeout": 1.0, "close_spread": 0.2},
            )
            lb.path.write_text(new_text)
            lb.proc.signal(signal.SIGHUP)
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/whoami").json()["id"] == "b2")
            assert echoes(ws)  # the open websocket survived the reload
            assert close_code(ws, timeout=5) == 1001  # ...and drains off the removed backend
        # an invalid config on SIGHUP is rejected and the running one stays
        lb.path.write_text(new_text.replace('mode = "http"', 'mode = "udp"'))
        lb.proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload rejected" in lb.proc.output())  # type: ignore[union-attr]
        assert "listeners.public.mode" in lb.proc.output()
        assert httpx.get(f"http://127.0.0.1:{port}/whoami").json()["id"] == "b2"
    finally:
        lb.stop()
