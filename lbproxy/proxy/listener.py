"""A listening socket and everything it owns: connections, idle sweep, byte flushing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import cast

from lbproxy.config.types import Address, ListenerConfig
from lbproxy.core.http1 import error_response
from lbproxy.core.pool import Pool
from lbproxy.core.ws_rules import ping_timeouts, ws_policy
from lbproxy.ops.fdreserve import MAX_LINGERING, FdReserve
from lbproxy.ops.stats import Stats
from lbproxy.proxy.admission import Admission, Sharing
from lbproxy.proxy.connection import HttpClient
from lbproxy.proxy.context import ListenerContext, Tracked
from lbproxy.proxy.deadlines import idle_tick, sweep_tick
from lbproxy.proxy.splice import Splicer
from lbproxy.proxy.tcp_conn import TcpClient
from lbproxy.proxy.wstunnel import ws_sweep

log = logging.getLogger("lbproxy.listener")


def _ssl_context(config: ListenerConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context


class Refusal(asyncio.Protocol):
    """A client refused to keep the fd reserve free: http gets a 503 and a lingering close
    (while few are lingering; past that, and in tcp mode, it is closed at once)."""

    __slots__ = ("ctx", "fds", "timer", "transport")

    LINGER = 2.0

    def __init__(self, ctx: ListenerContext, fds: FdReserve) -> None:
        self.ctx = ctx
        self.fds = fds
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        ctx, fds = self.ctx, self.fds
        name = ctx.config.name
        ctx.stats.connections_total[name] += 1
        ctx.stats.rejected[(name, "fd_reserve")] += 1
        if ctx.config.mode != "http" or fds.lingering >= MAX_LINGERING:
            transport.close()
            return
        transport.write(error_response(503, detail="out of file descriptors"))
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # FIN, then drop what the client still sends until it closes
        fds.lingering += 1
        self.timer = ctx.loop.call_later(self.LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # (close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.fds.lingering -= 1


class Listener:
    """Accepts connections for one [listeners.NAME] table and owns them."""

    def __init__(
        self,
        config: ListenerConfig,
        pool: Pool,
        stats: Stats,
        *,
        reuse_port: bool = False,
        log_json: bool = False,
        fds: FdReserve | None = None,
        sharing: Sharing | None = None,
    ) -> None:
        self.config = config
        self.fds = fds  # the process's fd reserve: new connections refused when it is reached
        self.stats = stats
        self.reuse_port = reuse_port
        self.log_json = log_json
        self.ctx = ListenerContext(
            config, pool, stats, asyncio.get_running_loop(), log_json=log_json
        )
        if config.tls is None:  # (TLS bytes must go through the SSL object: Python tunnel)
            self.ctx.splicer = splicer = Splicer.create(self.ctx.loop)
            if splicer is not None:
                splicer.set_policy(self.ctx.ws_policy)
        self.sharing = sharing  # (where scope "redis" / --workers N limits are shared)
        self._limits(config)
        self.server: asyncio.Server | None = None
        self.address: Address | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def _limits(self, config: ListenerConfig) -> None:
        """[listeners.NAME.limits]: the admission (None when no limit is set: one test)."""
        ctx = self.ctx
        if not config.limits.enabled:
            ctx.limits = None
        elif ctx.limits is None:
            ctx.limits = Admission(config.name, config.limits, self.sharing, ctx.loop)
        else:
            ctx.limits.update(config.limits)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def connections(self) -> set[Tracked]:
        return self.ctx.connections

    def native_tunnels(self) -> int:
        """Tunnels the native engine forwards right now."""
        return 0 if self.ctx.splicer is None else len(self.ctx.splicer)

    def _factory(self) -> Callable[[], asyncio.Protocol]:
        ctx = self.ctx
        tcp = self.config.mode == "tcp"
        fds = self.fds
        if fds is None:
            return (lambda: TcpClient(ctx)) if tcp else (lambda: HttpClient(ctx))

        def admit() -> asyncio.Protocol:
            if not fds.admit():
                return Refusal(ctx, fds)
            return TcpClient(ctx) if tcp else HttpClient(ctx)

        return admit

    async def start(self, sock: socket.socket | None = None) -> Address:
        """Bind and listen, or listen on ``sock`` (the predecessor's socket, on an upgrade)."""
        loop = asyncio.get_running_loop()
        bind = self.config.bind
        if sock is not None:
            self.server = await loop.create_server(
                self._factory(), sock=sock, backlog=4096, ssl=_ssl_context(self.config)
            )
        else:
            self.server = await loop.create_server(
                self._factory(),
                bind.host,
                bind.port,
                backlog=4096,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
                ssl=_ssl_context(self.config),
            )
        bound = self.server.sockets[0].getsockname()
        self.address = Address(bind.host, int(bound[1]))
        self.ctx.port = self.address.port
        self._sweeper = loop.create_task(self._sweep())
        log.info(
            "listener %s (%s) on %s -> pool %s (%s tunnels)",
            self.name,
            self.config.mode,
            self.address,
            self.ctx.pool.name,
            "native" if self.ctx.splicer is not None else "Python",
        )
        return self.address

    def update(self, config: ListenerConfig, pool: Pool) -> None:
        """Reload: new timeouts/limits/pool for new connections (bind changes need a restart)."""
        self.config = config
        ctx = self.ctx
        ctx.config = config
        ctx.trusted = config.trusted_proxies
        self._limits(config)
        if ctx.pool is not pool:
            ctx.idle.close_all()
            ctx.pool = pool
        ctx.ws_policy = ws_policy(pool.config.websocket)  # (for the tunnels started from now)
        if isinstance(ctx.splicer, Splicer):
            ctx.splicer.set_policy(ctx.ws_policy)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    def finish_requests(self) -> None:
        """Shutdown: HTTP client connections idle between requests close now, those with a
        request in flight after its response (tunnels are left to the drain)."""
        for conn in list(self.ctx.connections):
            conn.finish_request()

    async def stop(self) -> None:
        """Stop accepting and abort whatever is still open (after a drain)."""
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for conn in list(self.ctx.connections):
            conn.abort("shutdown")
        self.ctx.idle.close_all()
        if self.ctx.splicer is not None:
            self.ctx.splicer.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)

    def flush_bytes(self) -> None:
        """Move the byte counts of open connections into the stats (the 1 s sampler)."""
        for conn in self.ctx.connections:
            conn.flush_bytes()

    async def _sweep(self) -> None:
        """Every tick: deadlines (response, request body, keep-alive idle) and idle upstream
        connections; every idle tick: close connections idle for idle_timeout and move byte
        counts into the stats. The tick follows the shortest configured timeout."""
        marks: dict[Tracked, tuple[int, float]] = {}
        next_idle = time.monotonic() + idle_tick(self.config.idle_timeout)
        while True:
            config, pool = self.config, self.ctx.pool.config
            await asyncio.sleep(
                sweep_tick(
                    config.handshake_timeout,
                    config.idle_timeout,
                    config.keepalive_timeout,
                    config.body_timeout,
                    pool.connect_timeout,  # (the native upgrade's connect deadline)
                    pool.response_timeout,
                    pool.upstream_keepalive_timeout,
                    *ping_timeouts(self.ctx.ws_policy),
                )
            )
            now = time.monotonic()
            if self.ctx.ws_policy.swept:
                ws_sweep(self.ctx, now)
            self._deadlines(now)
            self.ctx.idle.expire(now, self.ctx.pool.config.upstream_keepalive_timeout)
            if now >= next_idle:
                next_idle = now + idle_tick(self.config.idle_timeout)
                marks = self._idle_sweep(marks, now)

    def _deadlines(self, now: float) -> None:
        deadlines = self.ctx.deadlines
        passed = [conn for conn, when in deadlines.items() if when <= now]
        for conn in passed:
            if conn in deadlines:  # (an earlier one's handling may have ended it)
                conn.deadline_passed(now)

    def _idle_sweep(
        self, marks: dict[Tracked, tuple[int, float]], now: float
    ) -> dict[Tracked, tuple[int, float]]:
        idle_timeout = self.config.idle_timeout
        fresh: dict[Tracked, tuple[int, float]] = {}
        for conn in list(self.ctx.connections):
            conn.flush_bytes()
            seen = conn.activity()
            old = marks.get(conn)
            since = old[1] if old is not None and old[0] == seen else now
            if now - since >= idle_timeout:
                conn.abort(f"idle for {idle_timeout:g}s")
                continue
            fresh[conn] = (seen, since)
        return fresh
