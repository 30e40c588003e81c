"""Redis losing its data, lbproxy starting, and refused registrations, end to end.

Real redis-server, real `lbproxy serve` and reference backends, registrations heartbeating
with the real Registration code (docs/registry.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from lbproxy.core.pool import BackendState
from lbproxy.registry.register import Registration
from tests.support import Backend, Lbproxy, RedisServer, await_until, free_port
from tests.support.registry import (
    PREFIX,
    make_pool,
    raw_client,
    raw_register,
    redis_ids,
    state_of,
    watching,
)

pytestmark = pytest.mark.timeout(60)

TTL = 1.5


async def hold(condition: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert callable(condition) and condition(), "condition stopped holding"
        await asyncio.sleep(0.05)


async def test_flush_keeps_heartbeating_backends_dead_ones_wait_their_ttl(
    redis: RedisServer,
) -> None:
    pool = make_pool()
    live = Registration(redis.url, PREFIX, "chat", "live", "127.0.0.1:7501", ttl=0.9)
    leaving = Registration(redis.url, PREFIX, "chat", "leaving", "127.0.0.1:7502", ttl=30)
    try:
        async with (
            raw_client(redis.url) as client,
            watching(redis.url, {"chat": pool}, resync_interval=0.2) as watcher,
        ):
            await await_until(lambda: watcher.connected, timeout=5)
            await live.start()
            await leaving.start()
            await raw_register(client, "chat", "dead", "127.0.0.1:7503", ttl=1.2)  # no heartbeat
            await await_until(lambda: redis_ids(pool) == {"live", "leaving", "dead"}, timeout=3)
            await client.flushall()
            flushed = time.monotonic()
            sync = watcher.last_sync
            await await_until(lambda: watcher.last_sync > sync, timeout=2)  # saw it empty
            every_up = lambda: all(  # noqa: E731
                state_of(pool, i) is BackendState.UP for i in ("live", "leaving", "dead")
            )
            await hold(every_up, 0.6)
            # "dead" was never renewed: it leaves once its TTL (1.2 s) passed after the loss
            await await_until(lambda: "dead" not in pool.backends, timeout=3)
            waited = time.monotonic() - flushed
            print(f"vanished registration removed {waited:.2f}s after the flush (ttl 1.2s)")
            assert waited >= 1.0
            assert state_of(pool, "live") is BackendState.UP  # its heartbeat re-registered it
            assert await client.zscore(f"{PREFIX}:pool:chat:members", "live") is not None
            # an explicit deregistration acts at once, also during its grace (ttl 30 s)
            started = time.monotonic()
            await leaving.stop()
            await await_until(lambda: "leaving" not in pool.backends, timeout=1)
            print(f"deregistered backend gone in {time.monotonic() - started:.3f}s")
            assert state_of(pool, "live") is BackendState.UP
    finally:
        await live.stop()
        await leaving.stop()


def lb_config(redis_url: str, port: int, admin: int) -> str:
    return f"""
[admin]
listen = "127.0.0.1:{admin}"
[redis]
url = "{redis_url}"
prefix = "{PREFIX}"
start_timeout = 5
[listeners.public]
bind = "127.0.0.1:{port}"
pool = "chat"
[pools.chat]
discovery = "redis"
allowed_networks = ["0.0.0.0/0", "::/0"]
drain_timeout = 0.3
close_spread = 0.1
[pools.chat.health]
check = "tcp"
interval = 0.5
"""


class Upgrades:
    """New websocket upgrades, one after the other, from the first moment the port accepts."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.refused: list[str] = []
        self.first_ok_at = 0.0
        self.stop = False

    async def run(self) -> None:
        accepted = False
        while not self.stop:
            try:
                async with connect(f"ws://127.0.0.1:{self.port}/echo", open_timeout=5) as ws:
                    await ws.send("hi")
                    assert await asyncio.wait_for(ws.recv(), 5) == "hi"
                self.ok += 1
                self.first_ok_at = self.first_ok_at or time.monotonic()
            except ConnectionRefusedError:
                if accepted:
                    self.refused.append("connection refused after the port accepted")
                await asyncio.sleep(0.002)  # the port does not accept yet: not an upgrade
                continue
            except InvalidStatus as exc:
                self.refused.append(f"HTTP {exc.response.status_code}")
            except Exception as exc:  # reset, timeout, closed: all count as refused
                self.refused.append(repr(exc))
            accepted = True
            await asyncio.sleep(0.02)


def noticed_loss(lb: Lbproxy) -> bool:
    """lbproxy read the empty registry (kept the backends, or - broken - drained them)."""
    assert lb.proc is not None
    out = lb.proc.output()
    return "vanished without a deregistration" in out or "-> draining (registration" in out


def pools_view(admin: int) -> dict[str, str]:
    reply = httpx.get(f"http://127.0.0.1:{admin}/api/pools", timeout=3).json()
    return {b["id"]: b["state"] for b in reply["pools"]["chat"]["backends"]}


async def view(admin: int) -> dict[str, str]:
    return await asyncio.to_thread(pools_view, admin)


async def echo_all(held: list[ClientConnection]) -> int:
    """How many held websockets still answer (a 1001 or a cut makes recv fail)."""
    alive = 0
    for ws in held:
        with contextlib.suppress(Exception):
            await ws.send("still")
            if await asyncio.wait_for(ws.recv(), 3) == "still":
                alive += 1
    return alive


@contextlib.asynccontextmanager
async def registrations(url: str, backends: list[Backend]) -> AsyncIterator[list[Registration]]:
    regs = [Registration(url, PREFIX, "chat", f"r{i + 1}", b.address, ttl=TTL) for i, b in
            enumerate(backends)]  # fmt: skip
    regs.append(Registration(url, PREFIX, "chat", "r3", backends[1].address, ttl=TTL))
    try:
        for reg in regs:
            await reg.start()
        yield regs
    finally:
        for reg in regs:
            await reg.stop()


async def test_redis_data_loss_closes_nothing_refuses_nothing(
    redis: RedisServer, tmp_path: Path
) -> None:
    backends = [Backend("b1").start(), Backend("b2").start()]
    port, admin = free_port(), free_port()
    lb = Lbproxy(lb_config(redis.url, port, admin), tmp_path)
    stream = Upgrades(port)
    held: list[ClientConnection] = []
    restarted: RedisServer | None = None
    runner: asyncio.Task[None] | None = None
    try:
        async with registrations(redis.url, backends):
            runner = asyncio.create_task(stream.run())  # before lbproxy even starts
            lb.start()
            await await_until(lambda: stream.ok >= 5, timeout=20)
            assert stream.refused == [], f"refused right after the start: {stream.refused}"
            assert await view(admin) == {"r1": "up", "r2": "up", "r3": "up"}
            drained = httpx.post(f"http://127.0.0.1:{admin}/api/pools/chat/backends/r3/drain")
            assert drained.status_code == 202
            for _ in range(20):
                held.append(await connect(f"ws://127.0.0.1:{port}/echo", open_timeout=5))
            assert await echo_all(held) == 20

            # 1. FLUSHALL: the watcher sees an empty pool
            async with raw_client(redis.url) as client:
                await client.flushall()
            assert lb.proc is not None
            await await_until(lambda: noticed_loss(lb), 15)
            await asyncio.sleep(0.3 + 0.1 + 0.8)  # past drain_timeout + close_spread: no 1001
            assert await view(admin) == {"r1": "up", "r2": "up", "r3": "draining"}
            assert await echo_all(held) == 20
            assert stream.refused == []

            # 2. Redis restarted without persistence (same port, empty)
            redis.kill()
            restarted = await asyncio.to_thread(RedisServer(port=redis.port).start)
            await await_until(lambda: "reconnected to Redis" in lb.proc.output(), 20)  # type: ignore[union-attr]
            async with raw_client(restarted.url) as client:
                members = f"{PREFIX}:pool:chat:members"
                for _ in range(300):  # the heartbeats re-register within TTL/3
                    if await client.zcard(members) == 3:
                        break
                    await asyncio.sleep(0.05)
                assert await client.zcard(members) == 3
            await asyncio.sleep(0.3 + 0.1 + 0.8)
            assert await view(admin) == {"r1": "up", "r2": "up", "r3": "draining"}
            assert await echo_all(held) == 20
            ok_before = stream.ok
            await await_until(lambda: stream.ok > ok_before + 3, timeout=15)
            assert stream.refused == [], stream.refused
            print(f"{stream.ok} upgrades, 0 refused; 20 websockets held through both losses")
    finally:
        stream.stop = True
        if runner is not None:
            await asyncio.wait_for(runner, 10)
        for ws in held:
            with contextlib.suppress(Exception):
                await ws.close()
        lb.stop()
        for b in backends:
            b.stop()
        if restarted is not None:
            restarted.stop()


async def test_refused_registrations_e2e(redis: RedisServer, tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    lb = Lbproxy(lb_config(redis.url, port, admin), tmp_path).start(wait_ports=(port, admin))
    try:
        async with raw_client(redis.url) as client:
            bad = {
                "own-admin": f"127.0.0.1:{admin}",
                "own-listener": f"localhost:{port}",
                "metadata": "169.254.169.254:80",
                "any6": "[::]:80",
                "any4": f"0.0.0.0:{port}",
            }
            for backend_id, address in bad.items():
                await raw_register(client, "chat", backend_id, address)
            await raw_register(client, "chat", "fine", "127.0.0.1:1")
            await await_until(lambda: "fine" in pools_view(admin), timeout=5)
            await raw_register(client, "chat", "fine2", "127.0.0.1:2")  # another full read
            await await_until(lambda: "fine2" in pools_view(admin), timeout=5)
            assert set(pools_view(admin)) == {"fine", "fine2"}
            # a public client cannot reach the admin API through the listener
            assert httpx.get(f"http://127.0.0.1:{port}/api/pools", timeout=3).status_code in (
                502,
                503,
            )
        assert lb.proc is not None
        out = lb.proc.output()
        for backend_id in bad:
            assert out.count(f"registration {backend_id} at") == 1, (backend_id, out)
    finally:
        lb.stop()
