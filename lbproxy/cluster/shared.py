"""What an lbproxy instance shares with the others through Redis and does on its own
schedule (SPEC 12): the shared admission limits (limits_redis.py), the cluster-wide
connection counts (counts.py) and the rebalancer (ops/rebalancer.py). Built and
rebuilt from each configuration; owns them and stops them."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from lbproxy.cluster.counts import ClusterCounts
from lbproxy.cluster.limits_redis import RedisLimits, instance_id
from lbproxy.config.types import Config, RedisConfig
from lbproxy.core.pool import Pool
from lbproxy.core.shared_counts import ITEM, SharedCounts
from lbproxy.ops.rebalancer import Rebalancer
from lbproxy.ops.shared_limits import SharedLimits
from lbproxy.ops.stats import Stats


class Cluster:
    """``role``: the App's ("single", "supervisor", "worker"). The supervisor of ``--workers
    N`` holds no connection (no admission, no rebalancer there); a worker is named in Redis
    after its supervisor (the instance is the balancer, not one worker)."""

    def __init__(
        self,
        pools: Callable[[], Mapping[str, Pool]],
        stats: Stats,
        role: str = "single",
        counts: SharedCounts | None = None,
    ) -> None:
        self.pools = pools
        self.stats = stats
        self.holds_connections = role != "supervisor"
        self.instance = instance_id(role == "worker")
        self.limits: RedisLimits | None = None
        self.table: SharedLimits | None = None  # --workers N: scope "local" limits, shared
        if role == "worker" and counts is not None:  # (in the counts' memfd, after them)
            offset = counts.rows * counts.columns * ITEM
            self.table = SharedLimits(counts.fd, offset, counts.rows, counts.row)
        self.counts: ClusterCounts | None = None
        self.rebalancer: Rebalancer | None = None
        self._redis: RedisConfig | None = None

    async def apply(self, config: Config) -> None:
        """Start, restart or stop the parts ``config`` needs."""
        redis = config.redis
        if redis != self._redis:
            await self._stop_redis_parts()
            self._redis = redis
        wants_limits = self.holds_connections and any(
            lc.limits.enabled and lc.limits.scope == "redis" for lc in config.listeners.values()
        )
        if redis is not None and wants_limits and self.limits is None:
            # (per process: each worker writes its own counts; the sums are the balancer's)
            self.limits = RedisLimits(redis, instance_id(False), self.stats)
            self.limits.start()
        elif not wants_limits and self.limits is not None:
            await self.limits.stop()
            self.limits = None
        wants_counts = any(p.least_connections_scope == "cluster" for p in config.pools.values())
        if redis is not None and wants_counts and self.counts is None:
            self.counts = ClusterCounts(redis, self.pools, self.instance)
            self.counts.start()
        elif not wants_counts and self.counts is not None:
            await self.counts.stop()
            self.counts = None
        if self.holds_connections and self.rebalancer is None:
            self.rebalancer = Rebalancer(self.pools, self.stats)
            self.rebalancer.start()

    async def _stop_redis_parts(self) -> None:
        if self.limits is not None:
            await self.limits.stop()
            self.limits = None
        if self.counts is not None:
            await self.counts.stop()
            self.counts = None

    async def stop(self) -> None:
        await self._stop_redis_parts()
        if self.rebalancer is not None:
            await self.rebalancer.stop()
            self.rebalancer = None
