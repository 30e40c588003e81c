"""``lbproxy upgrade`` on the supervisor: start the next generation and hand over to it.

The order makes every step before the point of no return undoable:

1. the configuration on disk is validated (invalid: exit 2, nothing changes);
2. the code on disk is pre-flighted in a child (``python -m lbproxy check-config``: it
   imports and validates with the new code; failure: exit 1, nothing changes);
3. one new worker per old worker starts, from the new code, connected to its
   predecessor's hand-over channel; it loads its pool snapshot and says "ready" (one
   crashes or stays silent: the new ones are stopped, the old generation never noticed;
   exit 1 with the reason);
4. each old worker is told to hand over (handover.py): listening sockets, then tunnels;
   then it leaves (what could not move drains as on SIGTERM, within upgrade_timeout);
5. the answer goes out, then the supervisor re-executes itself with the new code (same
   PID: upgrade_state.py), keeping its workers and the shared count table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from typing import Any, Protocol

from lbproxy.config.load import load_config
from lbproxy.core.shared_counts import Columns, SharedCounts
from lbproxy.errors import ConfigError
from lbproxy.ops.app import App
from lbproxy.ops.pool_sync import add_stats, apply_snapshot, dump_stats, merge_stats
from lbproxy.ops.stats import Stats
from lbproxy.ops.upgrade_state import AdoptedChild, Child, Resume, exec_self

log = logging.getLogger("lbproxy.ops.upgrade")

START_TIMEOUT = 20.0  # a new worker has this long to load its snapshot and say ready
PREFLIGHT_TIMEOUT = 30.0
KILL_MARGIN = (
    5.0  # past admin.upgrade_timeout (+ this), what is left of an old generation is killed
)
EXEC_DELAY = 0.2  # the answer to POST /api/upgrade goes out before the re-exec


class Worker(Protocol):
    index: int
    row: int
    proc: Child
    stats: dict[str, Any]
    sent_version: int
    ready: asyncio.Event
    handed: asyncio.Event

    @property
    def sock(self) -> Any: ...
    @property
    def successor(self) -> Any: ...
    def send(self, message: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class Keeper(Protocol):
    """What the upgrade needs of the supervisor."""

    path: str
    app: App
    counts: SharedCounts
    columns: Columns
    version: int
    retired: Stats

    @property
    def procs(self) -> list[Any]: ...
    @procs.setter
    def procs(self, value: list[Any]) -> None: ...
    def snapshot_message(self) -> dict[str, Any]: ...
    async def _spawn(self, index: int, row: int, adopt: int = -1) -> Any: ...
    async def connect(self, worker: Any) -> None: ...
    def adopt_worker(self, index: int, row: int, pid: int, control: int, successor: int) -> Any: ...


class Generations:
    """The supervisor's generations: the upgrade itself, the leaving old workers, the
    state across the re-exec."""

    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper
        self.leaving: list[tuple[Any, float]] = []  # (old worker, kill deadline)
        self.busy = False
        self.last: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the steps ------------------------------------------------------------------
    async def upgrade(self) -> tuple[int, dict[str, object]]:
        """Run one upgrade; (0 | 1 | 2 | 3 busy, the answer document)."""
        if self.busy:
            return 3, {"error": "an upgrade is already running"}
        self.busy = True
        try:
            code, document = await self._upgrade()
        finally:
            if not document.get("exec"):
                self.busy = False
        if code == 0:
            asyncio.get_running_loop().call_later(EXEC_DELAY, self._exec)
        document.pop("exec", None)
        log.log(logging.WARNING if code == 0 else logging.ERROR, "upgrade: %s", document)
        return code, document

    async def _upgrade(self) -> tuple[int, dict[str, object]]:
        keeper = self.keeper
        try:
            load_config(keeper.path)
        except ConfigError as exc:
            return 2, {"error": "\n".join(exc.problems), "problems": list(exc.problems)}
        failed = await self._preflight()
        if failed is not None:
            return failed
        started = time.monotonic()
        new: list[Any] = []
        try:
            for old in keeper.procs:
                row = old.row + len(keeper.procs) if old.row < len(keeper.procs) else old.index
                new.append(await keeper._spawn(old.index, row, old.successor.fileno()))
                new[-1].send(keeper.snapshot_message())
                new[-1].sent_version = keeper.version
            reason = await self._all_ready(new)
        except OSError as exc:
            reason = f"cannot start the new workers: {exc}"
        if reason is not None:
            await self._abandon(new)
            return 1, {"error": f"the new generation did not start: {reason}"}
        old_procs = keeper.procs
        for old in old_procs:
            old.send({"t": "handover"})
        keeper.procs = new  # (generation + 1 shows once the re-executed supervisor answers)
        timeout = keeper.app.config.admin.upgrade_timeout
        deadline = time.monotonic() + timeout + KILL_MARGIN
        self.leaving += [(old, deadline) for old in old_procs]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(self._handed(old) for old in old_procs))
        handed = [self.last.pop(f"handed:{o.proc.pid}", {}) for o in old_procs]
        moved = sum(int(h.get("tunnels", 0)) for h in handed)
        handover = max((float(h.get("seconds", 0.0)) for h in handed), default=0.0)
        return 0, {
            "generation": keeper.app.generation + 1,
            "workers": [w.proc.pid for w in new],
            "moved": moved,
            "seconds": round(time.monotonic() - started, 3),
            "handover_seconds": round(handover, 3),
            "exec": True,
        }

    async def _preflight(self) -> tuple[int, dict[str, object]] | None:
        """The code on disk imports and accepts the configuration (in a child)."""
        argv = [sys.executable, "-m", "lbproxy", "check-config", self.keeper.path]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(PREFLIGHT_TIMEOUT):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return 1, {"error": "the new code did not answer check-config in time"}
        lines = err.decode(errors="replace").strip().splitlines()
        if proc.returncode == 2 and lines and not lines[-1].startswith("Traceback"):
            return 2, {"error": "\n".join(lines), "problems": lines}
        if proc.returncode != 0:
            tail = " | ".join(lines[-3:]) or f"exit status {proc.returncode}"
            return 1, {"error": f"the new code does not start: {tail}"}
        return None

    async def _all_ready(self, new: list[Any]) -> str | None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for worker in new:
                code = worker.proc.poll()
                if code is not None:
                    return f"worker {worker.index} (pid {worker.proc.pid}) exited with {code}"
            if all(w.ready.is_set() for w in new):
                return None
            await asyncio.sleep(0.05)
        return f"no answer within {START_TIMEOUT:g}s"

    async def _abandon(self, new: list[Any]) -> None:
        """Roll back: the new workers never got anything; stop them, free their rows."""
        for worker in new:
            if worker.proc.poll() is None:
                worker.proc.kill()
            await asyncio.get_running_loop().run_in_executor(None, worker.proc.wait)
            self.keeper.counts.zero_row(worker.row)
            worker.close()

    async def _handed(self, old: Any) -> None:
        while not old.handed.is_set() and old.proc.poll() is None:
            await asyncio.sleep(0.02)

    def heard(self, worker: Any, kind: str, message: dict[str, Any]) -> None:
        if kind == "ready":
            worker.ready.set()
        elif kind == "handed":
            self.last[f"handed:{worker.proc.pid}"] = message
            worker.handed.set()

    # -- the old generation leaving ---------------------------------------------
    def reap_leaving(self) -> None:
        now = time.monotonic()
        keep = []
        for old, deadline in self.leaving:
            if old.proc.poll() is None and now > deadline:
                log.error("upgrade: old worker (pid %d) still running: killed", old.proc.pid)
                old.proc.kill()
            if old.proc.poll() is None:
                keep.append((old, deadline))
                continue
            add_stats(self.keeper.retired, old.stats)
            old.stats = {}
            self.keeper.counts.zero_row(old.row)
            old.close()
        self.leaving = keep

    async def stop(self) -> None:
        for old, _ in self.leaving:
            with contextlib.suppress(ProcessLookupError):
                old.proc.send_signal(signal.SIGTERM)

    # -- across the re-exec ------------------------------------------------------
    def _exec(self) -> None:
        keeper = self.keeper
        now = time.monotonic()
        stats = merge_stats([keeper.app.stats, keeper.retired, *(o.stats for o, _ in self.leaving)])
        keep = [keeper.counts.fd]
        workers = []
        for w in keeper.procs:
            keep += [w.sock.fileno(), w.successor.fileno()]
            workers.append(
                {
                    "index": w.index,
                    "row": w.row,
                    "pid": w.proc.pid,
                    "control": w.sock.fileno(),
                    "successor": w.successor.fileno(),
                    "stats": w.stats,
                }
            )
        state = Resume(
            generation=keeper.app.generation + 1,
            version=keeper.version,
            counts_fd=keeper.counts.fd,
            rows=keeper.counts.rows,
            pools=keeper.snapshot_message()["pools"],
            retired=dump_stats(stats),
            workers=workers,
            leaving=[{"pid": o.proc.pid, "row": o.row, "in": d - now} for o, d in self.leaving],
        )
        exec_self(state, keep)

    async def resumed(self, state: Resume) -> None:
        """The re-executed supervisor takes its workers and state back."""
        keeper = self.keeper
        keeper.app.generation = state.generation
        add_stats(keeper.retired, state.retired)
        apply_snapshot(keeper.app.pools, state.pools)
        for entries in state.pools.values():
            for entry in entries:
                keeper.columns.claim(int(entry[5]))
        keeper.version = state.version
        procs = []
        for w in state.workers:
            worker = keeper.adopt_worker(
                w["index"], w["row"], w["pid"], w["control"], w["successor"]
            )
            worker.stats = w.get("stats", {})
            worker.sent_version = state.version
            await keeper.connect(worker)
            procs.append(worker)
        keeper.procs = procs
        now = time.monotonic()
        for o in state.leaving:
            gone = _Gone(int(o["pid"]), int(o["row"]))
            self.leaving.append((gone, now + float(o["in"])))
        log.warning("upgrade: generation %d serves (supervisor pid %d)", state.generation, 0)

    def on_signal(self) -> None:
        """SIGUSR2: the same as POST /api/upgrade (the result goes to the log)."""
        task = asyncio.get_running_loop().create_task(self.upgrade())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Gone:
    """An old worker still leaving when the supervisor re-executed (its PID only)."""

    def __init__(self, pid: int, row: int) -> None:
        self.proc = AdoptedChild(pid)
        self.row = row
        self.stats: dict[str, Any] = {}

    def close(self) -> None:
        pass
