"""Admission limits shared by every lbproxy instance on one Redis (``scope = "redis"``).

One Lua script per admission (layout in docs/registry.md); the admissions that arrive while
a batch is out go together in the next one (one pipeline, one round trip):

- ``{prefix}:limits:{listener}:rate:{ip}``: the client's GCRA theoretical arrival time
  (microseconds of the Redis clock), expiring once it is back in the past;
- ``{prefix}:limits:{listener}:conns:{ip}``: a hash, one field per instance: that
  instance's open connections from the IP and until when the field counts
  (``"count:expiry_ms"``). Each instance rewrites its fields when a count changes and
  every ``REFRESH`` seconds, so the counts of an instance that died stop counting after
  ``TTL`` seconds (the script drops expired fields).

Redis away: the admission fails open (admitted, counted locally), logged once per outage;
a probe every ``PROBE`` seconds notices its return (then every count is written again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from lbproxy.config.types import LimitsConfig, RedisConfig
from lbproxy.core.limits import ADMIT, CONNECTIONS, RATE, Decision
from lbproxy.ops.stats import Stats
from lbproxy.registry.watcher import open_client

log = logging.getLogger("lbproxy.core.limits")

TTL = 15.0  # seconds a field of the connection hash counts without being rewritten
REFRESH = 5.0
PROBE = 1.0
TIMEOUT = 0.25  # an admission waits at most this for Redis (then fails open)

ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nowms = math.floor(now / 1000)
local limit = tonumber(ARGV[3])
if limit > 0 then
  local total = tonumber(ARGV[5])
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    if all[i] ~= ARGV[4] then
      local count, exp = string.match(all[i + 1], '^(%d+):(%d+)$')
      if count and tonumber(exp) > nowms then
        total = total + tonumber(count)
      else
        redis.call('HDEL', KEYS[2], all[i])
      end
    end
  end
  if total >= limit then return {'connections_per_ip', '0'} end
end
local interval = tonumber(ARGV[1])
if interval > 0 then
  local tolerance = tonumber(ARGV[2])
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  if tat - now > tolerance then
    return {'rate_per_ip', string.format('%d', tat - now - tolerance)}
  end
  local new_tat = tat + interval
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX',
    string.format('%d', math.floor((new_tat - now) / 1000) + 1))
end
if limit > 0 then
  local ttl = tonumber(ARGV[6])
  redis.call('HSET', KEYS[2], ARGV[4], (tonumber(ARGV[5]) + 1) .. ':' .. (nowms + ttl))
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {'ok', '0'}
"""

SET_LUA = """
local t = redis.call('TIME')
local nowms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i = 1, #KEYS do
  local count = ARGV[i + 2]
  if count == '0' then
    redis.call('HDEL', KEYS[i], ARGV[1])
  else
    redis.call('HSET', KEYS[i], ARGV[1], count .. ':' .. (nowms + ttl))
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return #KEYS
"""


Admit = tuple[list[str], list[str | int], Callable[[Decision], None]]  # keys, args, done


def decision_of(reply: object) -> Decision:
    """The script's ``[verdict, retry_after_us]`` as a decision (anything else: admitted)."""
    if not isinstance(reply, list) or len(reply) != 2:
        return ADMIT
    verdict, retry_us = reply
    if verdict == RATE:
        return Decision(False, RATE, int(retry_us) / 1_000_000)
    if verdict == CONNECTIONS:
        return Decision(False, CONNECTIONS, 1.0)
    return ADMIT


def instance_id(worker: bool) -> str:
    """This instance's name in Redis: the balancer's (a worker uses its supervisor's PID)."""
    return f"{socket.gethostname()}:{os.getppid() if worker else os.getpid()}"


class RedisLimits:
    """The shared admission state of one lbproxy instance; owns its Redis client and tasks."""

    def __init__(self, config: RedisConfig, instance: str, stats: Stats) -> None:
        self.stats = stats
        stats.limits_redis_up = 1
        self.prefix = config.prefix
        self.instance = instance
        self.client: Redis = open_client(config.url, TIMEOUT)
        self.up = True  # (until the first failure)
        self.dirty: dict[tuple[str, str], int] = {}  # (listener, ip) -> count to write
        self.counts: dict[tuple[str, str], int] = {}  # every count this instance holds
        self._admit = self.client.register_script(ADMIT_LUA)
        self._set = self.client.register_script(SET_LUA)
        self._queue: list[Admit] = []
        self._sender: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def key(self, listener: str, kind: str, ip: str) -> str:
        return f"{self.prefix}:limits:{listener}:{kind}:{ip}"

    def submit(
        self,
        listener: str,
        ip: str,
        config: LimitsConfig,
        own: int,
        done: Callable[[Decision], None],
    ) -> None:
        """One admission (``own``: this instance's open connections from ``ip`` besides this
        one): ``done`` gets the decision once its batch is answered (always later, never
        from this call; Redis failing: admitted)."""
        rate = config.rate_per_ip
        interval = max(1, round(1_000_000 / rate)) if rate > 0 else 0
        args: list[str | int] = [interval, interval * max(config.burst - 1, 0)]
        args += [config.connections_per_ip, self.instance, own, int(TTL * 1000)]
        keys = [self.key(listener, "rate", ip), self.key(listener, "conns", ip)]
        self._queue.append((keys, args, done))
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        """Send the waiting admissions, one batch at a time, until none waits."""
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    replies = await self._batch(batch)
                except Exception as exc:  # (whatever the client raises: fail open, never hang)
                    self._went_away(exc)
                    replies = [None] * len(batch)
                for (_, _, done), reply in zip(batch, replies, strict=True):
                    done(decision_of(reply))
        finally:
            self._sender = None

    async def _batch(self, batch: list[Admit]) -> list[object]:
        """One pipeline of scripts (loaded again if Redis lost them, e.g. after a restart)."""
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            for keys, args, _ in batch:
                pipe.evalsha(self._admit.sha, len(keys), *keys, *args)
            replies: list[object] = await pipe.execute(raise_on_error=False)
            if not any(isinstance(reply, NoScriptError) for reply in replies):
                return replies
            await self.client.script_load(ADMIT_LUA)
        return replies

    def set_count(self, listener: str, ip: str, count: int, *, written: bool = False) -> None:
        """This instance now holds ``count`` connections from ``ip``: written soon, unless
        ``written`` (the admission script just wrote it); rewritten every REFRESH."""
        if count > 0:
            self.counts[(listener, ip)] = count
        else:
            self.counts.pop((listener, ip), None)
        if not written:
            self.dirty[(listener, ip)] = count
            self._wake.set()

    def _went_away(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            self.stats.limits_redis_up = 0
            log.warning("limits: Redis unreachable (%s): admitting without shared limits", exc)
            self._wake.set()

    async def _run(self) -> None:
        """Write changed counts; refresh every count; probe Redis while it is away."""
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + REFRESH
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PROBE if not self.up else REFRESH)
            self._wake.clear()
            try:
                if not self.up:
                    await self.client.ping()
                    self.up = True
                    self.stats.limits_redis_up = 1
                    log.warning("limits: Redis is back: shared limits apply again")
                    self.dirty.update(self.counts)
                if loop.time() >= next_refresh:
                    next_refresh = loop.time() + REFRESH
                    self.dirty.update(self.counts)
                await self._flush()
            except (TimeoutError, RedisError, OSError) as exc:
                self._went_away(exc)
                await asyncio.sleep(PROBE)

    async def _flush(self) -> None:
        while self.dirty:
            batch = list(self.dirty.items())[:500]
            for item, _ in batch:
                del self.dirty[item]
            keys = [self.key(listener, "conns", ip) for (listener, ip), _ in batch]
            counts = [count for _, count in batch]
            try:
                await self._set(keys=keys, args=[self.instance, int(TTL * 1000), *counts])
            except BaseException:
                for item, count in batch:
                    self.dirty.setdefault(item, count)
                raise

    async def stop(self) -> None:
        self.stats.limits_redis_up = None
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
