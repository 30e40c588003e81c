"""Cluster-wide least connections and rebalancing end to end (SPEC 12): real lbproxy
subprocesses, real backends, a real redis-server, websocket clients that reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from lbproxy.core.balance import ConsistentHash, key_hash
from tests.support import (
    Backend,
    Lbproxy,
    RedisServer,
    await_until,
    free_port,
    proxy_config,
)

pytestmark = pytest.mark.timeout(120)


def _get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)


def _pool(admin: int) -> dict[str, object]:
    pool: dict[str, object] = _get(admin, "/api/pools").json()["pools"]["main"]
    return pool


def _backend(admin: int, backend_id: str) -> dict[str, object]:
    backends = _pool(admin)["backends"]
    assert isinstance(backends, list)
    return next(b for b in backends if b["id"] == backend_id)


def _own(backend: Backend) -> int:
    """The websockets the backend itself holds (its /whoami)."""
    return int(_get(backend.port, "/whoami").json()["connections"])


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


class Clients:
    """Websockets to one lbproxy that reconnect when closed (as browsers do)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.closes: list[tuple[float, int | None, str]] = []  # (when, code, key)
        self.tasks: list[asyncio.Task[None]] = []
        self.open = 0

    def add(self, key: str = "") -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(self._hold(key)))

    async def _hold(self, key: str) -> None:
        headers = {"X-Key": key} if key else {}
        uri = f"ws://127.0.0.1:{self.port}/echo"
        while True:
            async with ws_connect(uri, additional_headers=headers, open_timeout=10) as ws:
                self.open += 1
                with contextlib.suppress(ConnectionClosed):
                    await ws.recv()
                self.open -= 1
                self.closes.append((time.monotonic(), ws.close_code, key))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def test_cluster_least_connections_counts_the_other_instance(
    tmp_path: Path, redis: RedisServer
) -> None:
    b1, b2 = Backend("b1").start(), Backend("b2").start()
    procs: list[Lbproxy] = []
    clients: list[Clients] = []
    try:
        extra = f'\n[redis]\nurl = "{redis.url}"\n'
        pool = {"least_connections_scope": "cluster"}
        text_a, port_a, admin_a = proxy_config([("b1", b1.address)], pool=pool, extra=extra)
        text_b, port_b, admin_b = proxy_config(
            [("b1", b1.address), ("b2", b2.address)], pool=pool, extra=extra
        )
        procs.append(Lbproxy(text_a, tmp_path, name="a").start(wait_ports=(port_a, admin_a)))
        procs.append(Lbproxy(text_b, tmp_path, name="b").start(wait_ports=(port_b, admin_b)))
        a, b = Clients(port_a), Clients(port_b)
        clients += [a, b]
        for _ in range(10):
            a.add()
        await await_until(lambda: _own(b1) == 10, timeout=20)
        # B learns A's counts within about a second
        await await_until(lambda: _pool(admin_b)["scope_effective"] == "cluster", timeout=10)
        await await_until(lambda: _backend(admin_b, "b1").get("cluster_active") == 10, timeout=10)
        for _ in range(10):
            b.add()
        await await_until(lambda: b.open == 10, timeout=20)
        assert (_own(b1), _own(b2)) == (10, 10)
        # A stops publishing: B drops it after the expiry
        procs[0].proc.signal(9)  # type: ignore[union-attr]
        await await_until(lambda: _backend(admin_b, "b1").get("cluster_active") == 0, timeout=15)
    finally:
        for each in clients:
            await each.stop()
        for proc in procs:
            proc.stop()
        b1.stop()
        b2.stop()


async def test_cluster_scope_without_redis_says_local(tmp_path: Path) -> None:
    b1 = Backend("b1").start()
    dead = free_port()
    text, port, admin = proxy_config(
        [("b1", b1.address)],
        pool={"least_connections_scope": "cluster"},
        extra=f'\n[redis]\nurl = "redis://127.0.0.1:{dead}/0"\n',
    )
    proc = Lbproxy(text, tmp_path).start(wait_ports=(port, admin))
    try:
        await asyncio.sleep(1.5)  # (a publish attempt or two)
        pool = _pool(admin)
        assert pool["scope_effective"] == "local"
        assert pool["least_connections_scope"] == "cluster"
        assert _get(port, "/whoami").status_code == 200  # serving on local counts
    finally:
        proc.stop()
        b1.stop()


def _fast_health() -> dict[str, object]:
    return {"check": "tcp", "interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}


async def test_rebalancing_after_a_backend_comes_up(tmp_path: Path) -> None:
    b1 = Backend("b1").start()
    b2 = Backend("b2")  # not running yet: down
    cps = 2  # (slow enough that the clients' timing jitter cannot fake a burst)
    extra = f"\n[pools.main.rebalance]\nmax_imbalance = 1.2\ncloses_per_second = {cps}\n"
    text, port, admin = proxy_config(
        [("b1", b1.address), ("b2", b2.address)], health=_fast_health(), extra=extra
    )
    proc = Lbproxy(text, tmp_path).start(wait_ports=(port, admin))
    clients = Clients(port)
    try:
        await await_until(lambda: _backend(admin, "b2")["state"] == "down", timeout=10)
        for _ in range(30):
            clients.add()
        await await_until(lambda: _own(b1) == 30, timeout=30)
        started = time.monotonic()
        b2.start()
        await await_until(lambda: _own(b1) <= 18 and _own(b2) >= 12, timeout=30)
        settled = time.monotonic() - started
        await asyncio.sleep(2.0)  # nothing more happens once balanced
        assert _own(b1) + _own(b2) == 30
        assert _own(b1) <= 18
        times = [when for when, _, _ in clients.closes]
        assert {code for _, code, _ in clients.closes} == {1001}
        assert 12 - 2 <= len(times) <= 12 + 2, (len(times), settled)
        for first in times:  # never more than closes_per_second in any second
            # (seen by the clients: a window a quarter second short for their jitter)
            assert sum(1 for t in times if first <= t < first + 0.75) <= cps, times
        metrics = _get(admin, "/metrics").text
        line = 'lbproxy_rebalance_closes_total{backend="b1",pool="main"}'
        assert f"{line} {float(len(times))}" in metrics
    finally:
        await clients.stop()
        proc.stop()
        b1.stop()
        b2.stop()


async def test_hash_pool_moves_only_the_keys_whose_owner_changed(tmp_path: Path) -> None:
    b1, b2 = Backend("h1").start(), Backend("h2").start()
    b3 = Backend("h3")  # not running yet: down
    extra = "\n[pools.main.rebalance]\nmax_imbalance = 1.0\ncloses_per_second = 20\n"
    pool = {"balance": "hash", "hash_key": "header:X-Key", "hash_balance_factor": 0}
    text, port, admin = proxy_config(
        [("h1", b1.address), ("h2", b2.address), ("h3", b3.address)],
        pool=pool,
        health=_fast_health(),
        extra=extra,
    )
    proc = Lbproxy(text, tmp_path).start(wait_ports=(port, admin))
    clients = Clients(port)
    keys = [f"user-{i}" for i in range(40)]
    before = ConsistentHash([("h1", 1), ("h2", 1)])
    after = ConsistentHash([("h1", 1), ("h2", 1), ("h3", 1)])

    def owner(table: ConsistentHash, key: str) -> str:
        return table.lookup(key_hash(key.encode()))

    moving = {k for k in keys if owner(before, k) != owner(after, k)}
    assert moving and all(owner(after, k) == "h3" for k in moving)
    try:
        await await_until(lambda: _backend(admin, "h3")["state"] == "down", timeout=10)
        for key in keys:
            clients.add(key)
        await await_until(lambda: clients.open == 40, timeout=30)
        on_h1 = sum(1 for k in keys if owner(before, k) == "h1")
        assert (_own(b1), _own(b2)) == (on_h1, 40 - on_h1)
        b3.start()
        await await_until(lambda: _own(b3) == len(moving) and clients.open == 40, timeout=30)
        await asyncio.sleep(1.0)
        closed = [key for _, _, key in clients.closes]
        assert sorted(closed) == sorted(moving)  # each moving key once, no other key
        assert _own(b3) == len(moving)
    finally:
        await clients.stop()
        proc.stop()
        for b in (b1, b2, b3):
            b.stop()


async def test_two_instances_rebalance_on_cluster_counts(
    tmp_path: Path, redis: RedisServer
) -> None:
    """Each instance closes only its own websockets, on the cluster's counts: together no
    more than needed."""
    b1 = Backend("b1").start()
    b2 = Backend("b2")  # not running yet: down
    extra = (
        "\n[pools.main.rebalance]\nmax_imbalance = 1.2\ncloses_per_second = 10\n"
        f'\n[redis]\nurl = "{redis.url}"\n'
    )
    pool = {"least_connections_scope": "cluster"}
    procs: list[Lbproxy] = []
    clients: list[Clients] = []
    try:
        for name in ("a", "b"):
            text, port, admin = proxy_config(
                [("b1", b1.address), ("b2", b2.address)],
                pool=pool,
                health=_fast_health(),
                extra=extra,
            )
            procs.append(Lbproxy(text, tmp_path, name=name).start(wait_ports=(port, admin)))
            await await_until(lambda a=admin: _backend(a, "b2")["state"] == "down", timeout=10)
            clients.append(Clients(port))
            for _ in range(15):
                clients[-1].add()
        await await_until(lambda: _own(b1) == 30, timeout=30)
        b2.start()
        await await_until(lambda: _own(b1) <= 18 and _own(b2) >= 12, timeout=30)
        await asyncio.sleep(3.0)  # (a publish or two later: nothing more to do)
        closes = [len(c.closes) for c in clients]
        assert _own(b1) + _own(b2) == 30
        assert _own(b1) <= 18
        assert 12 - 2 <= sum(closes) <= 12 + 3, closes
        assert all(n > 0 for n in closes), closes  # both took part, each on its own
    finally:
        for each in clients:
            await each.stop()
        for proc in procs:
            proc.stop()
        b1.stop()
        b2.stop()
