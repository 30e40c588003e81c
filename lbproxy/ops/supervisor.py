"""`serve --workers N`: one balancer on N cores.

The supervisor is the process `serve` started and stays for the service's whole life;
it never touches a client connection. It owns the admin API and dashboard, the health
checks (once per backend per interval for the whole balancer), the Redis watcher and
reloads (validated once, then applied in every worker), and the workers' lifecycle.
Workers share the listening ports (SO_REUSEPORT), count their connections in the shared
table (shared_counts.py) and follow the pool snapshots pushed to them (pool_sync.py):
at once on every state change, and at the latest every PUSH_INTERVAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from lbproxy.config.types import Config
from lbproxy.core.pool import Backend, BackendState, Pool
from lbproxy.core.shared_counts import NO_COLUMN, Columns, SharedCounts
from lbproxy.ops.app import App
from lbproxy.ops.pool_sync import add_counts, add_stats, decode, encode, merge_stats, snapshot_pools
from lbproxy.ops.stats import Stats
from lbproxy.ops.upgrade import Generations
from lbproxy.ops.upgrade_state import AdoptedChild, Child, Resume
from lbproxy.ops.workers import MAX_LINE
from lbproxy.proxy.tunnel import GRACE

log = logging.getLogger("lbproxy.ops.supervisor")

PUSH_INTERVAL = 0.2  # catch-up snapshot push, column reuse and worker liveness check
STOP_MARGIN = 5.0  # beyond drain_timeout + close_spread, stopping workers get SIGKILL
MAX_RESTARTS = 10  # per worker per minute: beyond that the supervisor gives up


class WorkerProc:
    """One worker process, the supervisor's end of its control socket, and of its hand-over
    channel to its successor (lbproxy upgrade: given to the next generation's worker)."""

    def __init__(
        self, index: int, row: int, proc: Child, sock: socket.socket, successor: socket.socket
    ) -> None:
        self.index = index
        self.row = row  # its row of the shared count table
        self.proc = proc
        self.sock = sock
        self.successor = successor
        self.ready = asyncio.Event()  # (a new generation's worker: its snapshot is loaded)
        self.handed = asyncio.Event()  # (an old generation's worker: it has handed over)
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.stats: dict[str, Any] = {}
        self.listeners: dict[str, int] = {}
        self.native: dict[str, int] = {}
        self.sent_version = 0

    @classmethod
    def spawn(
        cls, index: int, row: int, argv: list[str], counts_fd: int, adopt: int = -1
    ) -> WorkerProc:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        successor, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [child.fileno(), counts_fd, theirs.fileno()]
        argv = [*argv, "--control-fd", str(fds[0]), "--counts", f"{counts_fd}:{row}"]
        argv += ["--handover-fd", str(fds[2])]
        if adopt >= 0:
            argv += ["--adopt-fd", str(adopt)]
            fds.append(adopt)
        try:
            proc = subprocess.Popen(argv, pass_fds=fds)
        finally:
            child.close()
            theirs.close()
        return cls(index, row, proc, parent, successor)

    def send(self, message: Mapping[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode(message))

    def close(self) -> None:
        if self.reader_task is not None:
            self.reader_task.cancel()
        if self.writer is not None:
            self.writer.close()
        else:
            self.sock.close()
        self.successor.close()


class Supervisor:
    """The BalancerView of the supervisor's App, and the workers' keeper."""

    def __init__(
        self,
        config: Config,
        path: str,
        count: int,
        log_level: str,
        log_format: str,
        resume: Resume | None = None,
    ) -> None:
        self.path = path
        self.count = count
        self._argv = [sys.executable, "-m", "lbproxy", "serve", "--config", path]
        self._argv += ["--log-level", log_level, "--log-format", log_format]
        if resume is None:  # two rows per worker: an upgrade's two generations count apart
            self.counts = SharedCounts.create(rows=2 * count)
        else:
            self.counts = SharedCounts.attach(resume.counts_fd, resume.rows, -1)
        self.columns = Columns(self.counts.columns)
        self.resume = resume
        self.generations = Generations(self)
        self.app = App(
            config, log_json=log_format == "json", role="supervisor", counts=self.counts, view=self
        )
        self.app.upgrade = self.generations.upgrade
        self.procs: list[WorkerProc] = []
        self.retired = Stats()  # counters of workers that died (the totals never go back)
        self.version = 0
        self._last: dict[str, Any] | None = None
        self._restarts: list[list[float]] = [[] for _ in range(count)]
        self._stopping = False
        self._full_warned = False
        self._push_scheduled = False

    # -- BalancerView ---------------------------------------------------------------
    def stats(self) -> Stats:
        leaving = [w.stats for w, _ in self.generations.leaving]
        return merge_stats([self.app.stats, self.retired, *leaving, *(w.stats for w in self.procs)])

    def listeners(self) -> dict[str, int]:
        total = {name: 0 for name in self.app.config.listeners}
        for worker in self.procs:
            add_counts(total, worker.listeners)
        return total

    def native(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for worker in self.procs:
            add_counts(total, worker.native)
        return total

    def workers(self) -> list[dict[str, int]]:
        return [
            {
                "pid": w.proc.pid,
                "connections": self.counts.row_total(w.row),
                "accepted": sum(n for _, n in w.stats.get("connections_total", ())),
            }
            for w in self.procs
        ]

    # -- snapshots --------------------------------------------------------------
    def _take_column(self) -> int:
        column = self.columns.take()
        if column == NO_COLUMN and not self._full_warned:
            self._full_warned = True
            log.error(
                "shared count table full (%d backends): further backends counted per worker",
                self.counts.columns - 1,
            )
        return column

    def snapshot_message(self) -> dict[str, Any]:
        """The current pools (a new worker's first snapshot, the state across a re-exec)."""
        return {"t": "snapshot", "version": self.version, "pools": self._last or {}}

    def adopt_worker(self, index: int, row: int, pid: int, control: int, successor: int) -> Any:
        """A worker started by this supervisor's previous image (lbproxy upgrade)."""
        sock = socket.socket(fileno=control)
        return WorkerProc(index, row, AdoptedChild(pid), sock, socket.socket(fileno=successor))

    def push(self) -> None:
        """Send the pools to every worker that has not seen this state yet."""
        pools = snapshot_pools(self.app.pools, self._take_column)
        if pools != self._last:
            self._last = pools
            self.version += 1
        message = {"t": "snapshot", "version": self.version, "pools": pools}
        for worker in self.procs:
            if worker.sent_version != self.version:
                worker.send(message)
                worker.sent_version = self.version

    def _on_state(
        self,
        pool: Pool,
        backend: Backend,
        old: BackendState | None,
        new: BackendState | None,
        reason: str,
    ) -> None:
        self._push_soon()

    def _push_soon(self) -> None:
        """Push once the current changes are done (many changes at once: one push)."""
        if not self._push_scheduled:
            self._push_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_push)

    def _scheduled_push(self) -> None:
        self._push_scheduled = False
        self.push()

    def _watch_pools(self, watched: set[int]) -> None:
        for pool in self.app.pools.values():
            if id(pool) not in watched:
                watched.add(id(pool))
                pool.subscribe(self._on_state)

    # -- workers ----------------------------------------------------------------
    async def _spawn(self, index: int, row: int, adopt: int = -1) -> WorkerProc:
        argv = [*self._argv, "--worker-index", str(index), "--rows", str(self.counts.rows)]
        worker = WorkerProc.spawn(index, row, argv, self.counts.fd, adopt)
        await self.connect(worker)
        self._push_soon()  # its first snapshot (sent_version 0), once it is in self.procs
        return worker

    async def connect(self, worker: WorkerProc) -> None:
        """Read ``worker``'s control socket."""
        reader, worker.writer = await asyncio.open_unix_connection(sock=worker.sock, limit=MAX_LINE)
        worker.reader_task = asyncio.get_running_loop().create_task(self._read(worker, reader))

    async def _read(self, worker: WorkerProc, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, ValueError):
            while line := await reader.readline():
                message = decode(line)
                kind = None if message is None else message.get("t")
                if message is None:
                    log.error("worker %d: malformed message ignored", worker.index)
                elif kind == "stats":
                    worker.stats = message.get("stats", {})
                    worker.listeners = message.get("listeners", {})
                    worker.native = message.get("native", {})
                elif kind in ("ready", "handed", "took"):
                    self.generations.heard(worker, kind, message)
                elif kind == "resync":  # e.g. after its reload: send it the snapshot again
                    worker.sent_version = 0
                    self._push_soon()
                elif kind == "down":
                    pool = self.app.pools.get(str(message.get("pool")))
                    if pool is not None:
                        why = f"worker {worker.index}: {message.get('why')}"
                        pool.mark_down(str(message.get("id")), why)

    async def _tick(self) -> None:
        watched: set[int] = set()
        while True:
            self._watch_pools(watched)
            live = {b.column for pool in self.app.pools.values() for b in pool.backends.values()}
            self.columns.release_unused(live, self.counts)
            for pool in self.app.pools.values():  # removed ones the workers no longer hold
                for backend in [b for b in pool.backends.values() if b.removed]:
                    pool.forget_if_done(backend)
            self.push()
            await self._reap()
            self.generations.reap_leaving()
            await asyncio.sleep(PUSH_INTERVAL)

    async def _reap(self) -> None:
        """Replace every worker that died; what it held stops counting at once."""
        for i, worker in enumerate(self.procs):
            code = worker.proc.poll()
            if code is None:
                continue
            self.counts.zero_row(worker.row)
            add_stats(self.retired, worker.stats)
            worker.stats = {}
            worker.close()
            now = time.monotonic()
            recent = [t for t in self._restarts[i] if now - t < 60] + [now]
            self._restarts[i] = recent
            if len(recent) > MAX_RESTARTS:
                log.error("worker %d keeps dying; stopping the balancer", i)
                self.app.stopping.set()
                return
            log.error("worker %d (pid %d) exited with %s; replacing it", i, worker.proc.pid, code)
            self.procs[i] = await self._spawn(i, worker.row)

    async def _reload(self) -> None:
        """SIGHUP: validate once here; then every worker applies the same file."""
        if await self.app.reload(self.path):
            for worker in self.procs:
                worker.send({"t": "reload", "path": self.path})
            self.push()

    async def _stop_workers(self) -> None:
        self._stopping = True
        for worker in self.procs:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        pools = self.app.config.pools.values()
        limit = max((p.drain_timeout + p.close_spread for p in pools), default=0.0)
        deadline = time.monotonic() + limit + GRACE + STOP_MARGIN
        while time.monotonic() < deadline and any(w.proc.poll() is None for w in self.procs):
            await asyncio.sleep(0.05)
        for worker in self.procs:
            if worker.proc.poll() is None:
                log.error(
                    "worker %d (pid %d) did not stop: killing it", worker.index, worker.proc.pid
                )
                worker.proc.kill()
                worker.proc.wait()
            worker.close()

    # -- running ----------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        await self.app.start()
        if self.resume is not None:
            await self.generations.resumed(self.resume)
        else:
            self.procs = [await self._spawn(i, i) for i in range(self.count)]
        pids = ", ".join(str(w.proc.pid) for w in self.procs)
        log.warning("supervisor %d: %d workers (%s)", os.getpid(), self.count, pids)
        signals = 0
        reloads: set[asyncio.Task[None]] = set()

        def on_stop() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:  # a second one: the workers exit at once too
                for worker in self.procs:
                    with contextlib.suppress(ProcessLookupError):
                        worker.proc.send_signal(signal.SIGTERM)
            self.app.stopping.set()

        def on_hup() -> None:
            task = loop.create_task(self._reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        loop.add_signal_handler(signal.SIGUSR2, self.generations.on_signal)
        tick = loop.create_task(self._tick())
        try:
            await self.app.stopping.wait()
            log.warning("stopping: draining the workers")
        finally:
            tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick
            await self.generations.stop()
            await self._stop_workers()
            await self.app.stop()
            self.counts.close()
        log.warning("stopped")
        return 0
