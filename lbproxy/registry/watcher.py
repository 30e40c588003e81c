"""Feed pools with discovery = "redis" from the Redis registry (layout: docs/registry.md).

One background task keeps a session alive: subscribe to the change channel, load a full
snapshot, then three cooperating tasks run until the connection fails: the listener (events
plus PING liveness on the subscription), and the sync worker (event-driven pool syncs, the
periodic full resync, and re-checks at the earliest known expiry). On failure the pools keep
their last known backends and the session is rebuilt with exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from lbproxy.config.types import Address, RedisConfig
from lbproxy.core.pool import Pool
from lbproxy.registry.apply import PoolFeeder
from lbproxy.registry.schema import (
    EXPIRED_LINGER,
    SNAPSHOT_SCRIPT,
    backend_key,
    backoff_delay,
    check_url,
    events_channel,
    members_key,
    parse_event,
    parse_snapshot,
    redact_url,
    scrub,
)

log = logging.getLogger("lbproxy.registry.register")

EXPIRY_MARGIN = 0.02  # re-check this long after a known expiry (server/local clock mapping)


def open_client(url: str, timeout: float) -> Redis:
    """A Redis client without redis-py's own retries: the callers decide how to retry."""
    check_url(url)
    client: Redis = Redis.from_url(
        url,
        decode_responses=True,
        encoding_errors="replace",
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return client


class RegistryWatcher:
    """Feeds every pool with discovery = "redis" from Redis: snapshot, events, periodic resync."""

    def __init__(
        self,
        config: RedisConfig,
        pools: Mapping[str, Pool],
        *,
        resync_interval: float = 5.0,
        ping_interval: float = 2.0,
        ping_timeout: float = 2.0,
        backoff_base: float = 0.2,
        backoff_max: float = 5.0,
        command_timeout: float = 3.0,
        own_addresses: Iterable[Address] = (),
    ) -> None:
        self.config = config
        self.connected = False
        self.last_sync = 0.0
        self.loaded = asyncio.Event()  # set once the first full snapshot has been applied
        self._pools: dict[str, Pool] = dict(pools)
        self._resync_interval = resync_interval
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._command_timeout = command_timeout
        self._rng = random.Random()
        self._channel = events_channel(config.prefix)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._dirty: set[str] = set()
        self._next_full = 0.0
        self._expiry: dict[str, float] = {}  # pool -> monotonic time of its earliest expiry
        self._feeder = PoolFeeder(own_addresses)
        self._outage_since: float | None = None
        self._last_heard = 0.0

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        """Start the background task; returns at once (Redis may still be unreachable)."""
        check_url(self.config.url)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-watcher")

    async def wait_loaded(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first snapshot; True once it is applied."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.loaded.wait()
        return self.loaded.is_set()

    def set_own_addresses(self, addresses: Iterable[Address]) -> None:
        """lbproxy's own listen/admin addresses (refused as registrations); resyncs if new."""
        own = frozenset(addresses)
        if own != self._feeder.own:
            self._feeder.own = own
            self._next_full = 0.0
            self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 10.0)
        self.connected = False

    def update_pools(self, pools: Mapping[str, Pool]) -> None:
        """Take a new pool mapping (after a reload) and resync every pool at once."""
        self._pools = dict(pools)
        for pool in self._pools.values():
            if pool.config.discovery != "redis":
                self._feeder.drop_redis_backends(pool, "pool no longer uses redis discovery")
        watched = self._watched()
        self._feeder.keep_only(watched)
        for name in [n for n in self._expiry if n not in watched]:
            del self._expiry[name]
        self._next_full = 0.0
        self._wake.set()

    def _watched(self) -> dict[str, Pool]:
        return {n: p for n, p in self._pools.items() if p.config.discovery == "redis"}

    # -- session loop ------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while True:
            error, was_up = await self._attempt()
            if was_up:
                attempt = 0
            if not isinstance(error, RedisError | OSError | TimeoutError):
                log.error("registry: watcher session failed", exc_info=error)
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning(
                    "registry: Redis at %s unreachable (%s); keeping the last known backends "
                    "and retrying with backoff",
                    redact_url(self.config.url),
                    scrub(_describe(error), self.config.url),
                )
            await asyncio.sleep(
                backoff_delay(attempt, self._backoff_base, self._backoff_max, self._rng)
            )
            attempt += 1

    async def _attempt(self) -> tuple[BaseException | None, bool]:
        """Run one session until it fails; return (why, whether it got connected)."""
        client = open_client(self.config.url, self._command_timeout)
        pubsub = client.pubsub()
        error: BaseException | None = None
        try:
            await self._session(client, pubsub)
        except* Exception as group:
            error = group.exceptions[0]
        finally:
            was_up = self.connected
            self.connected = False
            await _close(client, pubsub)
        return error, was_up

    async def _session(self, client: Redis, pubsub: PubSub) -> None:
        await pubsub.subscribe(self._channel)
        await self._await_subscribed(pubsub)
        script = client.register_script(SNAPSHOT_SCRIPT)
        self._feeder.begin_session(time.monotonic())
        await self._sync(client, script, set(self._watched()), full=True)
        self.connected = True
        self.loaded.set()
        if self._outage_since is not None:
            log.warning(
                "registry: reconnected to Redis at %s after %.1fs; resynced",
                redact_url(self.config.url),
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
        async with asyncio.TaskGroup() as group:
            group.create_task(self._listen(pubsub))
            group.create_task(self._sync_worker(client, script))

    async def _await_subscribed(self, pubsub: PubSub) -> None:
        """Wait for the SUBSCRIBE confirmation so no event can slip before the snapshot."""
        async with asyncio.timeout(self._command_timeout):
            while True:
                message = await pubsub.get_message(timeout=self._command_timeout)
                if message is not None and message.get("type") == "subscribe":
                    self._last_heard = time.monotonic()
                    return

    # -- listener: events and liveness -------------------------------------
    async def _listen(self, pubsub: PubSub) -> None:
        next_ping = time.monotonic() + self._ping_interval
        waiting_since: float | None = None
        while True:
            now = time.monotonic()
            if waiting_since is not None and self._last_heard >= waiting_since:
                waiting_since = None
            if waiting_since is not None and now - waiting_since > self._ping_timeout:
                raise ConnectionError(
                    f"no reply to PING on the subscription within {self._ping_timeout}s"
                )
            if now >= next_ping:
                await pubsub.ping()
                waiting_since = waiting_since or now
                next_ping = now + self._ping_interval
            until = next_ping if waiting_since is None else waiting_since + self._ping_timeout
            message = await pubsub.get_message(timeout=max(0.01, min(until, next_ping) - now))
            if message is not None:
                self._last_heard = time.monotonic()
                if message.get("type") == "message":
                    self._on_event(str(message.get("data")))

    def _on_event(self, data: str) -> None:
        try:
            event, pool, backend_id = parse_event(data)
        except ValueError as exc:
            self._feeder.log_once(
                ("event", data[:200]), "registry: ignoring malformed event %r: %s", data[:200], exc
            )
            return
        if pool in self._watched():
            if event == "leave":  # explicit: acts at once (a vanished key only starts a grace)
                self._feeder.note_leave(pool, backend_id, time.monotonic())
            self._dirty.add(pool)
            self._wake.set()

    # -- sync worker ---------------------------------------------------------
    async def _sync_worker(self, client: Redis, script: AsyncScript) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            watched = set(self._watched())
            full = now >= self._next_full
            due = watched if full else self._dirty & watched
            due |= {name for name, at in self._expiry.items() if at <= now and name in watched}
            if due:
                self._dirty -= due
                await self._sync(client, script, due, full=full)
                continue
            self._dirty.clear()
            wake_at = min(self._next_full, min(self._expiry.values(), default=math.inf))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake_at - now)):
                    await self._wake.wait()

    async def _sync(
        self, client: Redis, script: AsyncScript, names: set[str], *, full: bool
    ) -> None:
        """Read the snapshot of ``names`` in one round trip and apply it to the pools."""
        order = sorted(names)
        if order:
            sent = time.monotonic()
            replies = await self._read(client, script, order)
            received = time.monotonic()
            watched = self._watched()
            for name, reply in zip(order, replies, strict=True):
                pool = watched.get(name)
                if pool is None:
                    continue
                earliest = self._feeder.apply(pool, parse_snapshot(reply), received, sent)
                if earliest is None:
                    self._expiry.pop(name, None)
                else:
                    self._expiry[name] = max(earliest + EXPIRY_MARGIN, received + EXPIRY_MARGIN)
        if full:
            self.last_sync = time.monotonic()
            self._next_full = self.last_sync + self._resync_interval

    async def _read(
        self, client: Redis, script: AsyncScript, names: list[str]
    ) -> list[list[object]]:
        prefix = self.config.prefix
        async with client.pipeline(transaction=False) as pipe:
            for name in names:
                await script(
                    keys=[members_key(prefix, name)],
                    args=[backend_key(prefix, name, ""), EXPIRED_LINGER],
                    client=pipe,
                )
            replies: list[list[object]] = await pipe.execute()
        return replies


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def _close(client: Redis, pubsub: PubSub) -> None:
    """Close both connections; bounded, so a stuck socket cannot hang stop()."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await client.aclose()
