"""Rebalancing (README "Rebalancing"): one task that closes websockets of this process
with 1001, as the pure rules in rebalance.py decide, at most closes_per_second per pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from lbproxy.core.pool import Backend, BackendState, Closable, Pool
from lbproxy.core.rebalance import Pacer, PeakTotal, excess, holder_rate, moved, own_share
from lbproxy.ops.stats import Stats

log = logging.getLogger("lbproxy.core.rebalance")

TICK = 0.1  # seconds between two looks at a pool with nothing to close


class _PoolState:
    __slots__ = ("epoch", "moves", "pacer", "peak", "plan", "up_ids")

    def __init__(self, pool: Pool) -> None:
        self.pacer = Pacer()
        self.peak = PeakTotal()
        self.up_ids = _up_ids(pool)
        self.moves: list[Closable] = []  # hash pools: tunnels to move, newest first
        self.epoch: object = None  # scope "cluster": the other instances' counts planned on
        self.plan: dict[str, int] = {}  # backend -> closes left for this instance


def _up_ids(pool: Pool) -> tuple[str, ...]:
    return tuple(sorted(b.id for b in pool.backends.values() if b.state is BackendState.UP))


class Rebalancer:
    """Owns its task; reads the pools through ``pools`` (swapped on reload)."""

    def __init__(self, pools: Callable[[], Mapping[str, Pool]], stats: Stats) -> None:
        self.pools = pools
        self.stats = stats
        self._states: dict[str, _PoolState] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = TICK
            now = loop.time()
            pools = self.pools()
            for name in set(self._states) - set(pools):
                del self._states[name]
            for pool in pools.values():
                if pool.config.rebalance.max_imbalance <= 0:
                    self._states.pop(pool.name, None)
                    continue
                state = self._states.get(pool.name)
                if state is None:
                    state = self._states[pool.name] = _PoolState(pool)
                delay = min(delay, self._tick(pool, state, now))
            await asyncio.sleep(max(delay, 0.001))

    def _tick(self, pool: Pool, state: _PoolState, now: float) -> float:
        """Close one websocket of ``pool`` if one should go now; seconds until the next look."""
        wait = state.pacer.wait(now)
        if wait > 0:
            return wait
        found = self._hash_next(pool, state) if pool.config.balance == "hash" else None
        if found is None and pool.config.balance != "hash":
            found = self._least_next(pool, state, now)
        if found is None:
            return TICK
        conn, backend, key, share = found
        if key is not None and pool.config.balance == "hash":
            pool.forget(key)
        conn.go_away()
        pool.sent_away(backend, conn)
        self.stats.rebalance_closes[(pool.name, backend.id)] += 1
        return state.pacer.took(now, pool.config.rebalance.closes_per_second * share)

    @staticmethod
    def _least_next(
        pool: Pool, state: _PoolState, now: float
    ) -> tuple[Closable, Backend, bytes | None, float] | None:
        up = [b for b in pool.backends.values() if b.state is BackendState.UP]
        if len(up) < 2:
            return None
        loads = {b.id: pool.load(b) for b in up}
        weights = {b.id: pool.effective_weight(b, now) for b in up}
        total = state.peak.add(now, sum(loads.values()))
        over = excess(loads, weights, pool.config.rebalance.max_imbalance, total)
        mine: dict[str, list[Closable]] = {}
        for conn, (backend, _) in pool.tunnels.items():
            if backend.id in over and conn not in backend.leaving:
                mine.setdefault(backend.id, []).append(conn)
        shares = {b: own_share(n, len(mine.get(b, ())), loads[b]) for b, n in over.items()}
        if pool.remote is not None and pool.remote is not state.epoch:
            # fresh counts of the other instances: this instance's part until the next ones
            # (theirs are up to two publishes old: recomputed every tick, each instance would
            # close what the others already did)
            state.epoch, state.plan = pool.remote, shares
        by_id = {b.id: b for b in up}
        for backend_id in sorted(over, key=lambda b: -over[b]):
            own = mine.get(backend_id, [])
            allowed = shares[backend_id]
            if pool.remote is not None:
                allowed = min(allowed, state.plan.get(backend_id, 0))
            if allowed > 0:
                if pool.remote is not None:
                    state.plan[backend_id] -= 1
                conn = own[-1]  # the newest
                share = holder_rate(1.0, len(own), loads[backend_id])
                return conn, by_id[backend_id], pool.tunnels[conn][1], share
        return None

    @staticmethod
    def _hash_next(
        pool: Pool, state: _PoolState
    ) -> tuple[Closable, Backend, bytes | None, float] | None:
        up_ids = _up_ids(pool)
        if up_ids != state.up_ids:
            state.up_ids = up_ids
            tunnels = [
                (conn, backend.id, key)
                for conn, (backend, key) in reversed(pool.tunnels.items())
                if conn not in backend.leaving
            ]
            homes = {key: pool.home(key) for _, _, key in tunnels if key is not None}
            state.moves = moved(tunnels, homes)
            if state.moves:
                log.info("pool %s: %d websocket(s) to move", pool.name, len(state.moves))
        while state.moves:
            conn = state.moves.pop(0)
            entry = pool.tunnels.get(conn)
            if entry is None or conn in entry[0].leaving or entry[1] is None:
                continue
            home = pool.home(entry[1])
            if home is not None and home != entry[0].id:
                return conn, entry[0], entry[1], 1.0
        return None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
