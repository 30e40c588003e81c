"""Opening a backend connection: pick, connect with a timeout, retry other backends."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar, cast

HIGH_WATER = 256 * 1024  # per-transport write buffer before the peer is paused
# lbproxy itself is out of something (file descriptors, buffers): not the backend's fault
LOCAL_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

if TYPE_CHECKING:
    from lbproxy.pool import Backend
    from lbproxy.proxy.context import ListenerContext

P = TypeVar("P", bound=asyncio.BaseProtocol)


class Pending(asyncio.Protocol):
    """Holds a fresh backend connection until the tunnel takes it over."""

    __slots__ = ("buf", "closed", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.buf += data

    def eof_received(self) -> bool:
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "connect_timeout"
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return "connect_refused"
    return "connect_error"


async def connect_with_retries(
    ctx: ListenerContext,
    key: bytes | None,
    factory: Callable[[Backend], P],
    first: Backend | None = None,
    avoid: frozenset[str] = frozenset(),
) -> tuple[Backend, asyncio.Transport, P] | int:
    """Connect to a backend of the listener's pool, retrying others on failure.

    Returns (backend, transport, protocol), or the HTTP status to answer with:
    503 when no backend is up at all, 502 when every attempt failed.
    """
    pool = ctx.pool
    loop = ctx.loop
    stats = ctx.stats
    tried: set[str] = set(avoid)
    attempts = pool.config.retries + 1 - len(avoid)
    backend = first
    while attempts > 0:
        if backend is None:
            backend = pool.pick(key, tried)
            if backend is None:
                return 503 if not tried else 502
        attempts -= 1
        chosen = backend
        try:
            async with asyncio.timeout(pool.config.connect_timeout):
                transport, protocol = await loop.create_connection(
                    partial(factory, chosen), chosen.address.host, chosen.address.port
                )
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, OSError) and exc.errno in LOCAL_ERRORS:
                stats.upstream_errors[(pool.name, chosen.id, "local_resources")] += 1
                return 503  # (no passive failure, no other backend: it would fail the same)
            reason = _reason(exc)
            stats.upstream_errors[(pool.name, chosen.id, reason)] += 1
            pool.connect_failed(chosen, reason)
            tried.add(chosen.id)
            backend = None
            continue
        # (the passive-failure streak is reset by the first answer, not by the connect:
        # a backend that accepts and then resets must still count as failing)
        return chosen, transport, protocol
    return 502
