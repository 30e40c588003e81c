"""tcp mode (L4): bytes only, affinity by client IP, optional PROXY header."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from lbproxy.core.proxy_protocol import proxy_header
from lbproxy.core.retry import Answer
from lbproxy.proxy.admit import admit_tcp
from lbproxy.proxy.connect import Pending, connect_with_retries
from lbproxy.proxy.context import ListenerContext
from lbproxy.proxy.tunnel import Link


class TcpClient(asyncio.Protocol):
    """A client connection of a tcp listener, until its tunnel is up."""

    __slots__ = ("buf", "closed", "ctx", "eof", "held", "peer", "started", "task", "transport")

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.held = ""  # the IP its connection is counted under (admission), until its tunnel
        self.eof = False
        self.peer: tuple[str, int] = ("", 0)
        self.started = 0.0
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        self.transport = transport
        self.started = time.monotonic()
        name = ctx.config.name
        ctx.stats.connections_total[name] += 1
        if len(ctx.connections) >= ctx.config.max_connections:
            ctx.stats.rejected[(name, "max_connections")] += 1
            transport.close()  # refused: FIN (a reset if it already sent data)
            return
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else ("", 0)
        transport.pause_reading()
        ctx.connections.add(self)
        if ctx.limits is None or admit_tcp(self, ctx.limits):
            self.start()

    def start(self) -> None:
        self.task = self.ctx.loop.create_task(self._connect())

    def refused(self, reason: str) -> None:
        """Over an admission limit: closed without a byte sent."""
        self.ctx.stats.rejected[(self.ctx.config.name, reason)] += 1
        self.ctx.connections.discard(self)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buf += data  # only before the tunnel exists (reading is paused meanwhile)

    def eof_received(self) -> bool:
        self.eof = True
        return True  # keep the transport; the tunnel passes the EOF on once connected

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        if self.held and self.ctx.limits is not None:
            self.ctx.limits.closed(self.held)
            self.held = ""

    async def _connect(self) -> None:
        ctx = self.ctx
        client = self.transport
        assert client is not None
        key = self.peer[0].encode()
        result = await connect_with_retries(ctx, key, lambda _backend: Pending())
        ctx.connections.discard(self)
        if isinstance(result, Answer):
            ctx.stats.rejected[(ctx.config.name, str(result.status))] += 1
            client.close()
            return
        backend, upstream, pending = result.backend, result.transport, result.protocol
        ctx.pool.connect_succeeded(backend)  # (no protocol to wait an answer from in L4)
        if self.closed or client.is_closing():
            upstream.close()
            return
        header = b""
        if ctx.config.proxy_protocol:
            sock = client.get_extra_info("sockname")
            header = proxy_header(ctx.config.proxy_protocol, self.peer, (sock[0], sock[1]))
        link = Link(ctx, backend, upstream, client, self.peer[0], self.started)
        self.held = ""  # (the tunnel's end releases it)
        ctx.stats.requests[(ctx.pool.name, backend.id)] += 1
        ctx.stats.handshake_seconds.observe(time.monotonic() - self.started)
        link.start(
            bytes(pending.buf), header + bytes(self.buf), offload=not (self.eof or pending.closed)
        )
        if self.eof:
            link.client.eof_received()
        if pending.closed:
            link.side_lost(link, "backend closed")

    # Tracked
    def activity(self) -> int:
        return len(self.buf)

    def go_away(self) -> None:
        self.abort("shutting down")

    def finish_request(self) -> None:
        pass  # (not an HTTP connection: the drain decides)

    def flush_bytes(self) -> None:
        pass  # (no byte is forwarded before it becomes a tunnel)

    def abort(self, reason: str) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.close()
