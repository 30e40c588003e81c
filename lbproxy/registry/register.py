"""Backend registration in Redis (``lbproxy register``, the reference backend) and discovery.

Registration keeps one backend's entry alive with an atomic heartbeat script every ttl/3;
the script announces join/change/drain on the events channel, deregistration announces
leave. The watcher that feeds pools lives in watcher.py and is re-exported here.
Layout and the commands a backend in any language must send: docs/registry.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import time
from collections.abc import Mapping

from redis.exceptions import RedisError

from lbproxy.config.types import MAX_WEIGHT
from lbproxy.errors import RegistryError
from lbproxy.registry.schema import (
    DEREGISTER_SCRIPT,
    HEARTBEAT_SCRIPT,
    META_PREFIX,
    backend_key,
    check_id,
    check_url,
    events_channel,
    members_key,
    parse_address,
    redact_url,
    scrub,
)
from lbproxy.registry.watcher import RegistryWatcher, open_client

__all__ = ["Registration", "RegistryWatcher", "redact_url", "run_register"]

log = logging.getLogger("lbproxy.registry.register")

MIN_TTL = 0.3


class Registration:
    """Keeps one backend registered: heartbeats every ttl/3, atomic writes, PUBLISH on change."""

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        pool: str,
        backend_id: str,
        address: str,
        weight: int = 1,
        ttl: float = 6.0,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        check_id(pool, "pool name")
        check_id(backend_id, "backend id")
        parse_address(address)
        if not 1 <= weight <= MAX_WEIGHT:
            raise ValueError(f"bad weight {weight}: an integer 1-{MAX_WEIGHT}")
        if not ttl >= MIN_TTL:
            raise ValueError(f"bad ttl {ttl}: at least {MIN_TTL} seconds")
        check_url(redis_url)
        self.url = redis_url
        self.prefix = prefix
        self.pool = pool
        self.backend_id = backend_id
        self.address = address
        self.weight = weight
        self.ttl = ttl
        self.meta = dict(meta or {})
        self.state = "up"
        self.instance = secrets.token_hex(8)
        self._timeout = min(2.0, max(0.2, ttl / 3))
        self._client = open_client(redis_url, self._timeout)
        self._heartbeat = self._client.register_script(HEARTBEAT_SCRIPT)
        self._deregister = self._client.register_script(DEREGISTER_SCRIPT)
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._outage_since: float | None = None
        self._registered = False
        self._closed = False

    async def start(self) -> None:
        """Register once (RegistryError when Redis is unreachable), then heartbeat."""
        try:
            await self._write()
        except (RedisError, OSError) as exc:
            await self._close()
            raise RegistryError(
                f"cannot reach Redis at {redact_url(self.url)}: {scrub(str(exc), self.url)}"
            ) from None
        self._registered = True
        log.info(
            "registry: registered %s (%s) in pool %s at %s",
            self.backend_id,
            self.address,
            self.pool,
            redact_url(self.url),
        )
        self._task = asyncio.create_task(self._heartbeat_loop(), name="registry-heartbeat")

    async def set_draining(self) -> None:
        """Mark the registration draining now (announced as a drain event)."""
        self.state = "draining"
        try:
            await self._write()
        except (RedisError, OSError) as exc:
            log.warning(
                "registry: could not mark %s draining now (%s); the next heartbeat retries",
                self.backend_id,
                scrub(str(exc), self.url),
            )

    async def stop(self) -> None:
        """Deregister (remove + leave event) and stop heartbeating; never raises on Redis errors."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._registered and not self._closed:
            await self._leave()
        await self._close()

    async def _leave(self) -> None:
        try:
            async with self._write_lock:
                await self._deregister(
                    keys=self._keys(),
                    args=[self.backend_id, self.instance, events_channel(self.prefix), self.pool],
                )
        except (RedisError, OSError) as exc:
            log.warning(
                "registry: could not deregister %s (%s); it expires within %.1fs",
                self.backend_id,
                scrub(str(exc), self.url),
                self.ttl,
            )
        else:
            log.info("registry: deregistered %s from pool %s", self.backend_id, self.pool)

    def _keys(self) -> list[str]:
        return [
            members_key(self.prefix, self.pool),
            backend_key(self.prefix, self.pool, self.backend_id),
        ]

    async def _write(self) -> None:
        args: list[str | int | float] = [
            self.backend_id,
            self.address,
            self.weight,
            self.state,
            repr(float(self.ttl)),
            events_channel(self.prefix),
            self.pool,
            self.instance,
        ]
        for key, value in sorted(self.meta.items()):
            args += [META_PREFIX + key, value]
        async with self._write_lock:
            await self._heartbeat(keys=self._keys(), args=args)

    async def _heartbeat_loop(self) -> None:
        interval = self.ttl / 3
        next_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            try:
                await self._write()
            except (RedisError, OSError) as exc:
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning(
                        "registry: heartbeat for %s failed (%s); retrying until Redis is back",
                        self.backend_id,
                        scrub(str(exc), self.url),
                    )
                next_at = time.monotonic() + min(interval, 1.0)
                continue
            if self._outage_since is not None:
                log.warning(
                    "registry: heartbeat for %s succeeded again after %.1fs",
                    self.backend_id,
                    time.monotonic() - self._outage_since,
                )
                self._outage_since = None
            next_at = max(next_at + interval, time.monotonic() + interval / 2)

    async def _close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            await self._client.aclose()


async def run_register(
    redis_url: str,
    prefix: str,
    pool: str,
    address: str,
    backend_id: str | None,
    weight: int,
    ttl: float,
    drain_first: float,
) -> int:
    """Body of ``lbproxy register``: register, heartbeat until SIGTERM/SIGINT, deregister."""
    backend_id = backend_id or f"{pool}-{address}"
    try:
        registration = Registration(redis_url, prefix, pool, backend_id, address, weight, ttl)
    except (ValueError, RegistryError) as exc:
        print(f"lbproxy register: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:  # before registering: a signal must never skip the deregistration
        loop.add_signal_handler(sig, stop.set)
    try:
        return await _serve_registration(registration, stop, drain_first)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _serve_registration(
    registration: Registration, stop: asyncio.Event, drain_first: float
) -> int:
    try:
        await registration.start()
    except RegistryError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    name = registration.backend_id
    print(
        f"registered {name} ({registration.address}) in pool {registration.pool} "
        f"at {redact_url(registration.url)}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
        if drain_first > 0:
            stop.clear()
            await registration.set_draining()
            print(f"draining {name} for {drain_first}s", file=sys.stderr, flush=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_first):
                    await stop.wait()  # a second signal cuts the drain short
    finally:
        await registration.stop()
    print(f"deregistered {name}", file=sys.stderr, flush=True)
    return 0
