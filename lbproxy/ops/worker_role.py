"""A worker's side of ``serve --workers N``: what it takes from its supervisor (pool
snapshots, reloads, the end of the supervisor, the hand-over order of an upgrade) and
what it sends up (passive failures, the request for a new snapshot after a reload,
"ready" and "handed" during an upgrade: see handover.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol

from lbproxy.config.types import Config
from lbproxy.core.pool import Backend, BackendState, Pool
from lbproxy.ops.drain import Drainer
from lbproxy.ops.handover import give, receive_listeners, take
from lbproxy.ops.handover_wire import WireError
from lbproxy.ops.pool_sync import SNAPSHOT_REASON, apply_snapshot
from lbproxy.ops.workers import WorkerLink
from lbproxy.proxy.listener import Listener

FIRST_SNAPSHOT_TIMEOUT = 10.0  # a worker waits this long for its supervisor's first snapshot

log = logging.getLogger("lbproxy")


class WorkerApp(Protocol):
    """What the worker role needs of its App."""

    drain_limit: float
    drainer: Drainer

    @property
    def config(self) -> Config: ...

    @property
    def pools(self) -> Mapping[str, Pool]: ...
    @property
    def listeners(self) -> Mapping[str, Listener]: ...
    @property
    def stopping(self) -> asyncio.Event: ...
    async def reload(self, path: str) -> bool: ...


class WorkerRole:
    """Follows the supervisor over ``link``; owns the reload and hand-over tasks it starts."""

    def __init__(self, app: WorkerApp, link: WorkerLink) -> None:
        self.app = app
        self.link = link
        self.inherited: dict[str, socket.socket] = {}  # the predecessor's listening sockets
        self._adopt: socket.socket | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        link = self.link
        link.on_snapshot = lambda pools: apply_snapshot(self.app.pools, pools)
        link.on_lost = self.app.stopping.set
        link.on_reload = self._reload_soon
        link.on_handover = lambda: self._spawn(self._hand_over())
        await link.start()
        if not await link.wait_snapshot(FIRST_SNAPSHOT_TIMEOUT):
            log.warning("no pool snapshot from the supervisor yet: starting from the config")
        if link.adopt_fd >= 0:  # a new generation: ready; then the predecessor's sockets
            link.send({"t": "ready"})
            sock = socket.socket(fileno=link.adopt_fd)
            sock.setblocking(True)
            self._adopt = sock
            try:
                loop = asyncio.get_running_loop()
                self.inherited = await loop.run_in_executor(None, receive_listeners, sock)
            except WireError as exc:  # (bound afresh instead: nothing was accepting there)
                log.error("upgrade: %s", exc)

    def listening(self) -> None:
        """The listeners run: a new generation's worker now takes the tunnels over."""
        if self.link.adopt_fd >= 0:
            self._spawn(self._take_over())

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _take_over(self) -> None:
        if self._adopt is None:
            return
        taken = await take(self.app.listeners, self._adopt)
        for pool in self.app.pools.values():  # (a drain that started before the upgrade)
            for backend in pool.backends.values():
                if backend.connections:
                    self.app.drainer.resume(pool, backend)
        log.warning("upgrade: took over %d tunnel(s) from the previous generation", taken)
        self.link.send({"t": "took", "tunnels": taken})

    async def _hand_over(self) -> None:
        """The supervisor's order: everything that can move goes; then leave (what stays
        leaves as on SIGTERM, within admin.upgrade_timeout)."""
        fd = self.link.handover_fd
        timeout = self.app.config.admin.upgrade_timeout
        started = time.monotonic()
        moved = 0
        if fd >= 0:
            self.link.handover_fd = -1
            sock = socket.socket(fileno=fd)
            sock.setblocking(True)
            try:
                moved = await give(self.app.listeners, sock, started + timeout / 2)
            except WireError as exc:
                log.error("upgrade: hand-over failed: %s", exc)
            finally:
                sock.close()
        elapsed = time.monotonic() - started
        log.warning("upgrade: handed %d tunnel(s) over in %.3fs", moved, elapsed)
        self.link.send({"t": "handed", "tunnels": moved, "seconds": elapsed})
        self.app.drain_limit = max(0.0, timeout - elapsed - 1.0)
        self.app.stopping.set()

    def _reload_soon(self, path: str) -> None:
        self._spawn(self._reload_then_resync(path))

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
