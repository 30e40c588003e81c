"""Graceful draining: a draining backend's open connections get drain_timeout, then
1001 closes spread over close_spread seconds (so clients do not reconnect at once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from lbproxy.core.pool import Backend, BackendState, Closable, Pool

log = logging.getLogger("lbproxy.ops.drain")


async def close_spread(
    conns: Sequence[Closable],
    spread: float,
    sent: Callable[[Closable], None] | None = None,
) -> None:
    """Ask each connection to go away, evenly spread over ``spread`` seconds; ``sent`` is
    called for each one as it is asked."""
    if not conns:
        return
    step = spread / len(conns) if spread > 0 else 0.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, conn in enumerate(conns):
        delay = start + i * step - loop.time()
        if delay > 0.001:
            await asyncio.sleep(delay)
        conn.go_away()
        if sent is not None:
            sent(conn)


class Drainer:
    """Watches pools; for every backend that starts draining, runs its drain schedule."""

    def __init__(self) -> None:
        self._tasks: dict[Backend, asyncio.Task[None]] = {}

    def watch(self, pool: Pool) -> None:
        pool.subscribe(self._on_state)

    def _on_state(
        self,
        pool: Pool,
        backend: Backend,
        old: BackendState | None,
        new: BackendState | None,
        reason: str,
    ) -> None:
        if new is BackendState.DRAINING:
            self.resume(pool, backend)
        elif new is BackendState.UP:
            running = self._tasks.get(backend)
            if running is not None:
                del self._tasks[backend]
                running.cancel()
                log.info("pool %s backend %s: drain cancelled (%s)", pool.name, backend.id, reason)

    def resume(self, pool: Pool, backend: Backend) -> None:
        """Run the drain schedule of a draining backend unless it runs (also for tunnels
        taken over from the previous generation: their drain_timeout starts again here)."""
        if backend.state is BackendState.DRAINING and backend not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._drain(pool, backend))
            self._tasks[backend] = task
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        for backend, running in list(self._tasks.items()):
            if running is task:
                del self._tasks[backend]

    async def _drain(self, pool: Pool, backend: Backend) -> None:
        config = pool.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.drain_timeout
        while backend.connections and loop.time() < deadline:
            await asyncio.sleep(min(0.1, max(deadline - loop.time(), 0.0)))
        conns = list(backend.connections)
        if conns:
            log.info(
                "pool %s backend %s: closing %d connection(s) over %.1fs",
                pool.name,
                backend.id,
                len(conns),
                config.close_spread,
            )
        await close_spread(conns, config.close_spread, lambda conn: pool.sent_away(backend, conn))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
