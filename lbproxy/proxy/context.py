"""What every connection of one listener shares: config, pool, counters, the idle upstream cache."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from lbproxy.config.types import ListenerConfig
from lbproxy.core.balance import HashKeySpec, parse_hash_key
from lbproxy.core.pool import Backend, Closable, Pool
from lbproxy.core.ws_rules import WsPolicy, ws_policy
from lbproxy.ops.stats import Stats
from lbproxy.proxy.admission import Admission

if TYPE_CHECKING:
    from lbproxy.proxy.types import SplicerLike

access_log = logging.getLogger("lbproxy.access")


class Tracked(Protocol):
    """A client connection as the listener sees it (idle sweep, drain, shutdown)."""

    def activity(self) -> int:
        """Bytes moved so far, both ways (the idle sweep compares snapshots)."""

    def go_away(self) -> None:
        """Leave gracefully (1001 close for websockets, finish the request for HTTP)."""

    def finish_request(self) -> None:
        """Shutdown: an HTTP connection closes when idle, else after its response; a tunnel
        does nothing here (the drain decides when it goes)."""

    def flush_bytes(self) -> None:
        """Move the bytes counted so far into the stats (the 1 s sampler, the idle sweep)."""

    def abort(self, reason: str) -> None:
        """Close now (idle timeout, forced shutdown)."""


class Timed(Protocol):
    """A client connection waiting on a deadline (response, request body, keep-alive idle)."""

    def deadline_passed(self, now: float) -> None:
        """Its deadline in ``ListenerContext.deadlines`` passed (the sweep calls this)."""


class IdleUpstreams:
    """Keep-alive upstream connections per backend, ready for the next plain-HTTP request.

    Each remembers when it became idle: one idle for ``max_age`` (the pool's
    upstream_keepalive_timeout, below the backend's own) is closed, never reused."""

    __slots__ = ("by_backend", "limit")

    def __init__(self, limit: int = 256) -> None:
        # (insertion-ordered: oldest first, and take() reuses the most recent)
        self.by_backend: dict[Backend, dict[asyncio.Transport, float]] = {}
        self.limit = limit

    def put(self, backend: Backend, transport: asyncio.Transport, now: float) -> bool:
        idle = self.by_backend.get(backend)
        if idle is None:  # (not setdefault: that builds a new empty dict on every call)
            idle = self.by_backend[backend] = {}
        elif len(idle) >= self.limit:
            return False
        idle[transport] = now
        return True

    def take(self, backend: Backend, now: float, max_age: float) -> asyncio.Transport | None:
        idle = self.by_backend.get(backend)
        while idle:
            transport, since = idle.popitem()
            if now - since >= max_age:
                transport.close()  # (older ones too: the sweep closes them)
            elif not transport.is_closing():
                return transport
        return None

    def discard(self, backend: Backend, transport: asyncio.Transport) -> None:
        idle = self.by_backend.get(backend)
        if idle is not None and idle.pop(transport, None) is not None and not idle:
            del self.by_backend[backend]

    def expire(self, now: float, max_age: float) -> int:
        """Close every connection idle for ``max_age`` or more; how many were closed."""
        closed = 0
        for backend in list(self.by_backend):
            idle = self.by_backend[backend]
            old = [t for t, since in idle.items() if now - since >= max_age]
            for transport in old:
                del idle[transport]
                transport.close()
            if not idle:
                del self.by_backend[backend]
            closed += len(old)
        return closed

    def close_all(self, keep: Callable[[Backend], bool] | None = None) -> None:
        for backend in list(self.by_backend):
            if keep is not None and keep(backend):
                continue
            for transport in self.by_backend.pop(backend):
                transport.close()


class ListenerContext:
    """Shared, per-listener state handed to each connection's protocol."""

    __slots__ = (
        "access_log",
        "config",
        "connections",
        "deadlines",
        "idle",
        "key_cache",
        "limits",
        "log_json",
        "loop",
        "pool",
        "port",
        "proto",
        "splicer",
        "stats",
        "trusted",
        "ws_policy",
    )

    def __init__(
        self,
        config: ListenerConfig,
        pool: Pool,
        stats: Stats,
        loop: asyncio.AbstractEventLoop,
        *,
        log_json: bool = False,
    ) -> None:
        self.config = config
        self.pool = pool
        self.stats = stats
        self.loop = loop
        self.connections: set[Tracked] = set()
        # client connections waiting on a deadline -> when (the listener's sweep checks them)
        self.deadlines: dict[Timed, float] = {}
        self.idle = IdleUpstreams()
        self.proto = b"https" if config.tls is not None else b"http"
        self.port = config.bind.port
        self.trusted = config.trusted_proxies
        self.log_json = log_json
        self.access_log = access_log.isEnabledFor(logging.INFO)
        self.key_cache: tuple[str, HashKeySpec] | None = None
        self.splicer: SplicerLike | None = None  # the listener's native engine, if any
        self.ws_policy: WsPolicy = ws_policy(pool.config.websocket)  # (the listener updates it)
        self.limits: Admission | None = None  # [listeners.NAME.limits], when any is set

    def tunnel_ended(self, conn: Closable, backend: Backend, client_ip: str) -> None:
        """A tunnel closed: it leaves the listener, its backend and its client's count."""
        self.connections.discard(conn)
        self.pool.detach(backend, conn)
        if self.limits is not None:
            self.limits.closed(client_ip)

    def key_spec(self) -> HashKeySpec:
        """The parsed hash_key of the current pool config (re-parsed after a reload)."""
        spec = self.pool.config.hash_key
        cached = self.key_cache
        if cached is None or cached[0] != spec:
            cached = self.key_cache = (spec, parse_hash_key(spec))
        return cached[1]

    def is_trusted(self, client_ip: str) -> bool:
        if not self.trusted:
            return False
        try:
            addr = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)
