"""In-process fakes for the HTTP client tests (uvicorn's MockTransport style): a client
transport that records what lbproxy writes, and a loop whose create_connection follows a
script per backend port instead of opening sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from lbproxy.config.types import Address, BackendConfig, ListenerConfig, PoolConfig
from lbproxy.core.pool import Pool
from lbproxy.ops.stats import Stats
from lbproxy.proxy.connection import HttpClient
from lbproxy.proxy.context import ListenerContext


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        super().__init__()
        self.peer = peer
        self.out = bytearray()
        self.closed = False
        self.eof = False
        self.paused = False
        self.protocol: Any = None

    def write(self, data: Any) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol


class FakeLoop:
    """The real running loop, but create_connection answers from ``script`` (port ->
    "accept" | "refuse") and records every attempt and the transports it made."""

    def __init__(self, loop: asyncio.AbstractEventLoop, script: dict[int, str]) -> None:
        self.loop = loop
        self.script = script
        self.attempts: list[int] = []
        self.upstreams: list[FakeTransport] = []

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        return self.loop.call_later(delay, callback, *args)

    def create_task(self, coro: Any) -> asyncio.Task[Any]:
        return self.loop.create_task(coro)

    async def create_connection(self, factory: Any, host: str, port: int) -> Any:
        self.attempts.append(port)
        if self.script.get(port) != "accept":
            raise ConnectionRefusedError(111, "Connection refused")
        protocol = factory()
        transport = FakeTransport(("127.0.0.1", port))
        transport.protocol = protocol
        protocol.connection_made(transport)
        self.upstreams.append(transport)
        return transport, protocol


class Rig:
    """One listener context with backends on fake ports, and its client connections."""

    def __init__(self, script: dict[int, str], **pool: Any) -> None:
        self.loop = FakeLoop(asyncio.get_running_loop(), script)
        backends = tuple(
            BackendConfig(f"b{port}", Address("127.0.0.1", port)) for port in sorted(script)
        )
        listen = pool.pop("listener", {})
        config = ListenerConfig("web", Address("127.0.0.1", 8080), "p", **listen)
        self.pool = Pool(PoolConfig(name="p", backends=backends, balance="round-robin", **pool))
        self.stats = Stats()
        self.ctx = ListenerContext(config, self.pool, self.stats, self.loop)  # type: ignore[arg-type]

    def client(self) -> tuple[HttpClient, FakeTransport]:
        client = HttpClient(self.ctx)
        transport = FakeTransport()
        transport.protocol = client
        client.connection_made(transport)
        return client, transport
