"""Opening a backend connection: pick, connect with a timeout, retry other backends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Generic, TypeVar, cast

from lbproxy.core.retry import LOCAL_ERRORS as LOCAL_ERRORS
from lbproxy.core.retry import UNCOUNTED, Answer, Facts, Failure, blame, decide, from_exception

HIGH_WATER = 256 * 1024  # per-transport write buffer before the peer is paused

if TYPE_CHECKING:
    from lbproxy.core.pool import Backend
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


@dataclass(frozen=True, slots=True)
class Connected(Generic[P]):
    """A backend connection made: its backend, transport and protocol."""

    backend: Backend
    transport: asyncio.Transport
    protocol: P


def account(ctx: ListenerContext, backend: Backend, failure: Failure, answered: bool) -> bool:
    """Count ``failure`` of ``backend`` in the stats and its passive health (the I/O half of
    ``retry.decide``); True when the backend is to be avoided for this request."""
    pool = ctx.pool
    if failure not in UNCOUNTED:
        ctx.stats.upstream_errors[(pool.name, backend.id, failure.value)] += 1
    passive = blame(failure, answered)
    if passive is None:
        return False
    pool.connect_failed(backend, passive)
    return True


async def connect_with_retries(
    ctx: ListenerContext,
    key: bytes | None,
    factory: Callable[[Backend], P],
    first: Backend | None = None,
    avoid: frozenset[str] = frozenset(),
) -> Connected[P] | Answer:
    """Connect to a backend of the listener's pool, retrying others on failure.

    Returns the connection, or the error to answer with (``retry.decide``): 503 when no
    backend is up at all or lbproxy is out of resources, 502 when every attempt failed.
    """
    pool = ctx.pool
    loop = ctx.loop
    tried: set[str] = set(avoid)
    backend = first
    while True:
        if backend is None:
            backend = pool.pick(key, tried)
            if backend is None:
                return cast(Answer, decide(Failure.NO_BACKEND, Facts(tried=len(tried))))
        chosen = backend
        try:
            async with asyncio.timeout(pool.config.connect_timeout):
                transport, protocol = await loop.create_connection(
                    partial(factory, chosen), chosen.address.host, chosen.address.port
                )
        except (OSError, TimeoutError) as exc:
            failure = from_exception(exc)
            if account(ctx, chosen, failure, False):
                tried.add(chosen.id)
            action = decide(failure, Facts(tried=len(tried), retries=pool.config.retries))
            if isinstance(action, Answer):
                return action
            backend = None
            continue
        # (the passive-failure streak is reset by the first answer, not by the connect:
        # a backend that accepts and then resets must still count as failing)
        return Connected(chosen, transport, protocol)
