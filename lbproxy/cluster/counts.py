"""Cluster-wide least connections (``least_connections_scope = "cluster"``; layout in
docs/registry.md).

About once a second each instance writes its per-backend counts of every such pool into
the hash ``{prefix}:lc:{pool}`` (its field: ``"{expiry_ms} {json counts}"``) and reads the
other instances' fields in the same Lua call (expired ones are dropped there). The pool
picks on its own counts plus the sum of the others' (``Pool.remote``). An instance that
stops publishing stops counting after ``TTL``. Redis away: ``Pool.remote`` is None (local
counts; ``/api/pools`` says ``"scope_effective": "local"``), logged once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping

from redis.exceptions import RedisError

from lbproxy.config.types import RedisConfig
from lbproxy.core.pool import Pool
from lbproxy.registry.watcher import open_client

log = logging.getLogger("lbproxy.cluster.shared")

INTERVAL = 1.0
TTL = 3.0
TIMEOUT = 0.5

PUBLISH_LUA = """
local t = redis.call('TIME')
local nowms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], (nowms + ttl) .. ' ' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local exp = tonumber(string.match(all[i + 1], '^(%d+) '))
  if exp == nil or exp <= nowms then
    redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] ~= ARGV[1] then
    out[#out + 1] = string.sub(all[i + 1], string.len(tostring(exp)) + 2)
  end
end
return out
"""


def remote_counts(documents: Iterable[str]) -> dict[str, int]:
    """The sum of the other instances' counts per backend (bad documents are skipped)."""
    total: dict[str, int] = {}
    for text in documents:
        try:
            counts = json.loads(text)
        except ValueError:
            continue
        if not isinstance(counts, dict):
            continue
        for backend, count in counts.items():
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                total[backend] = total.get(backend, 0) + count
    return total


def own_counts(pool: Pool) -> dict[str, int]:
    return {b.id: pool.active(b) for b in pool.backends.values()}


class ClusterCounts:
    """Publishes and reads the counts of every pool with scope "cluster"; owns its task."""

    def __init__(
        self, config: RedisConfig, pools: Callable[[], Mapping[str, Pool]], instance: str
    ) -> None:
        self.prefix = config.prefix
        self.pools = pools
        self.instance = instance
        self.client = open_client(config.url, TIMEOUT)
        self._publish = self.client.register_script(PUBLISH_LUA)
        self.up = True
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            pools = self.pools().values()
            cluster = [p for p in pools if p.config.least_connections_scope == "cluster"]
            for pool in pools:
                if pool.config.least_connections_scope != "cluster":
                    pool.remote = None  # (a reload made it local)
            try:
                for pool in cluster:
                    await self._exchange(pool)
                if not self.up:
                    self.up = True
                    log.warning("cluster counts: Redis is back: picks use the cluster's counts")
            except (TimeoutError, RedisError, OSError) as exc:
                for pool in cluster:
                    pool.remote = None
                if self.up:
                    self.up = False
                    log.warning(
                        "cluster counts: Redis unreachable (%s): picking on local counts", exc
                    )
            await asyncio.sleep(INTERVAL)

    async def _exchange(self, pool: Pool) -> None:
        document = json.dumps(own_counts(pool), separators=(",", ":"))
        others = await self._publish(
            keys=[f"{self.prefix}:lc:{pool.name}"],
            args=[self.instance, int(TTL * 1000), document],
        )
        pool.remote = remote_counts(others)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for pool in self.pools().values():
            pool.remote = None
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
