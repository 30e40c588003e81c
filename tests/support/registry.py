"""Helpers for the registry tests.

Pools, a watcher context, raw registry writes (the plain MULTI/EXEC protocol of
docs/registry.md), run_register subprocesses, a custom redis-server, and a TCP proxy that
can turn into a black hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from lbproxy.config.types import BackendConfig, HealthConfig, PoolConfig, RedisConfig
from lbproxy.core.pool import BackendState, Pool
from lbproxy.registry.register import RegistryWatcher
from lbproxy.registry.schema import backend_key, events_channel, members_key
from tests.support.ports import REPO, free_port, port_open, wait_until
from tests.support.processes import Proc

PREFIX = "lbtest"


def make_pool(
    name: str = "chat",
    *,
    balance: str = "least-connections",
    allowed: tuple[str, ...] = (),
    static: tuple[BackendConfig, ...] = (),
    discovery: str = "redis",
) -> Pool:
    config = PoolConfig(
        name,
        balance=balance,  # type: ignore[arg-type]
        discovery=discovery,  # type: ignore[arg-type]
        allowed_networks=tuple(ipaddress.ip_network(n) for n in allowed),
        backends=static,
        health=HealthConfig(check="none"),
    )
    return Pool(config)


def redis_ids(pool: Pool) -> set[str]:
    """Ids of the live (not removed) redis-sourced backends of ``pool``."""
    return {b.id for b in pool.backends.values() if b.source == "redis" and not b.removed}


def state_of(pool: Pool, backend_id: str) -> BackendState | None:
    backend = pool.get(backend_id)
    return None if backend is None or backend.removed else backend.state


@contextlib.asynccontextmanager
async def watching(
    url: str, pools: Mapping[str, Pool], **kwargs: float
) -> AsyncIterator[RegistryWatcher]:
    watcher = RegistryWatcher(RedisConfig(url, PREFIX), pools, **kwargs)
    await watcher.start()
    try:
        yield watcher
    finally:
        await watcher.stop()


@contextlib.asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def raw_register(
    client: Redis,
    pool: str,
    backend_id: str,
    address: str,
    *,
    state: str = "up",
    weight: str = "1",
    ttl: float = 30.0,
    event: str | None = "join",
    extra: Mapping[str, str] | None = None,
) -> None:
    """Register like a non-Python backend would: TIME, then MULTI/DEL/HSET/PEXPIRE/ZADD/PUBLISH."""
    seconds, micros = await client.time()
    expiry = seconds + micros / 1_000_000 + ttl
    hkey = backend_key(PREFIX, pool, backend_id)
    fields: dict[Any, Any] = {
        "id": backend_id,
        "address": address,
        "weight": weight,
        "state": state,
    }
    fields.update(extra or {})
    async with client.pipeline(transaction=True) as pipe:
        pipe.delete(hkey)
        pipe.hset(hkey, mapping=fields)
        pipe.pexpire(hkey, int(ttl * 2000))
        pipe.zadd(members_key(PREFIX, pool), {backend_id: expiry})
        if event is not None:
            message = {"event": event, "pool": pool, "id": backend_id}
            pipe.publish(events_channel(PREFIX), json.dumps(message))
        await pipe.execute()


async def raw_leave(client: Redis, pool: str, backend_id: str, *, publish: bool = True) -> None:
    async with client.pipeline(transaction=True) as pipe:
        pipe.zrem(members_key(PREFIX, pool), backend_id)
        pipe.delete(backend_key(PREFIX, pool, backend_id))
        if publish:
            message = {"event": "leave", "pool": pool, "id": backend_id}
            pipe.publish(events_channel(PREFIX), json.dumps(message))
        await pipe.execute()


def register_proc(
    url: str, pool: str, address: str, backend_id: str, ttl: float, drain_first: float = 0.0
) -> Proc:
    """``lbproxy register`` as a real process (run_register, as the CLI calls it)."""
    call = (
        f"run_register({url!r}, {PREFIX!r}, {pool!r}, {address!r}, {backend_id!r}, 1, "
        f"{ttl!r}, {drain_first!r})"
    )
    code = (
        "import asyncio,sys; from lbproxy.registry.register import run_register; "
        f"sys.exit(asyncio.run({call}))"
    )
    return Proc([sys.executable, "-c", code], cwd=str(REPO))


class CustomRedis:
    """A redis-server with extra arguments (unix socket, TLS, passwords)."""

    def __init__(self, *args: str, tls: bool = False) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None, "redis-server not on PATH"
        self.dir = Path(tempfile.mkdtemp(prefix="lbproxy-redis-"))
        self.port = free_port()
        self.socket = str(self.dir / "redis.sock")
        base = [exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        base += ["--dir", str(self.dir), "--unixsocket", self.socket, "--unixsocketperm", "700"]
        if tls:
            base += ["--port", "0", "--tls-port", str(self.port)]
        else:
            base += ["--port", str(self.port)]
        self.proc = Proc([*base, *args])
        wait_until(lambda: port_open(self.port) and Path(self.socket).exists(), timeout=10)

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def custom_redis(*args: str, tls: bool = False) -> Iterator[CustomRedis]:
    server = CustomRedis(*args, tls=tls)
    try:
        yield server
    finally:
        server.stop()


class BlackholeProxy:
    """A TCP proxy to 127.0.0.1:target that can silently drop every byte (frozen)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if not self.frozen:
                    dst.write(data)
                    await dst.drain()
        finally:
            dst.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
