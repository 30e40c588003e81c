"""A worker's side of ``serve --workers N``: what it takes from its supervisor (pool
snapshots, reloads, the end of the supervisor) and what it sends up (passive failures,
the request for a new snapshot after a reload)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

from lbproxy.pool import Backend, BackendState, Pool
from lbproxy.pool_sync import SNAPSHOT_REASON, apply_snapshot
from lbproxy.workers import WorkerLink

FIRST_SNAPSHOT_TIMEOUT = 10.0  # a worker waits this long for its supervisor's first snapshot

log = logging.getLogger("lbproxy")


class WorkerApp(Protocol):
    """What the worker role needs of its App."""

    @property
    def pools(self) -> Mapping[str, Pool]: ...
    @property
    def stopping(self) -> asyncio.Event: ...
    async def reload(self, path: str) -> bool: ...


class WorkerRole:
    """Follows the supervisor over ``link``; owns the reload tasks it starts."""

    def __init__(self, app: WorkerApp, link: WorkerLink) -> None:
        self.app = app
        self.link = link
        self._reloads: set[asyncio.Task[bool]] = set()

    async def start(self) -> None:
        link = self.link
        link.on_snapshot = lambda pools: apply_snapshot(self.app.pools, pools)
        link.on_lost = self.app.stopping.set
        link.on_reload = self._reload_soon
        await link.start()
        if not await link.wait_snapshot(FIRST_SNAPSHOT_TIMEOUT):
            log.warning("no pool snapshot from the supervisor yet: starting from the config")

    def _reload_soon(self, path: str) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_then_resync(path))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload_then_resync(self, path: str) -> bool:
        """A worker's reload: then the whole snapshot again (a new pool's states, columns)."""
        done = await self.app.reload(path)
        self.link.send({"t": "resync"})
        return done

    def forward_down(
        self, pool: Pool, backend: Backend, old: object, new: object, reason: str
    ) -> None:
        """A worker's passive failure: the supervisor decides for the whole balancer."""
        if new is BackendState.DOWN and not reason.endswith(SNAPSHOT_REASON):
            self.link.send({"t": "down", "pool": pool.name, "id": backend.id, "why": reason})
