"""Active health checks (tcp/http/websocket) and recovery from passive failures.

One supervisor task follows the pool's membership (observer + a re-scan every
interval) and keeps one task per backend. Each backend task first waits a random
offset in [0, interval) so that many backends do not check in lockstep, then runs
one check per interval. ``rise`` consecutive passes mark a down backend up, ``fall``
consecutive failures mark an up backend down; draining backends are checked but
never changed. Passive failures (``Pool.connect_failed``) are counted by the pool;
active checks bring such a backend back. With ``check = "none"`` there is no active
check, so a backend marked down passively is given another chance after it has
been down for at least one interval (like nginx's ``fail_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from dataclasses import dataclass

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
)

from lbproxy.config.types import Address, HealthConfig
from lbproxy.core.pool import Backend, BackendState, Pool
from lbproxy.ops.stats import Stats
from lbproxy.proxy.connect import LOCAL_ERRORS

log = logging.getLogger("lbproxy.ops.health")

MAX_BODY = 64 * 1024
PING_PAYLOAD = b"lbproxy-health"


class CheckFailed(Exception):
    """A health check that did not pass; the message is the reason."""


class OutOfResources(Exception):
    """lbproxy itself could not run the check (no file descriptor, no memory): no verdict."""


@dataclass(slots=True)
class _BackendHealth:
    backend: Backend  # the instance the counters belong to (an id can get a new address)
    last_state: BackendState
    passes: int = 0
    failures: int = 0
    down_ticks: int = 0  # check = "none": intervals spent down


class HealthChecker:
    """Runs the active checks of one pool and applies rise/fall to it."""

    def __init__(self, pool: Pool, stats: Stats) -> None:
        self._pool = pool
        self._stats = stats
        self._health: dict[str, _BackendHealth] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._main: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._subscribed: weakref.WeakSet[Pool] = weakref.WeakSet()
        self._subscribe(pool)

    @property
    def checking(self) -> frozenset[str]:
        """Ids of the backends that currently have a check task."""
        return frozenset(self._tasks)

    async def start(self) -> None:
        if self._main is None:
            self._main = asyncio.create_task(self._run(), name=f"health:{self._pool.name}")

    async def stop(self) -> None:
        main, self._main = self._main, None
        if main is not None:
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
        self._tasks.clear()

    def reconfigure(self, pool: Pool) -> None:
        """Follow a reload: new pool object and/or new health settings."""
        self._pool = pool
        self._subscribe(pool)
        self._wake.set()

    # -- membership ----------------------------------------------------------
    def _subscribe(self, pool: Pool) -> None:
        if pool not in self._subscribed:
            self._subscribed.add(pool)
            pool.subscribe(self._on_change)

    def _on_change(
        self,
        pool: Pool,
        backend: Backend,
        old: BackendState | None,
        new: BackendState | None,
        reason: str,
    ) -> None:
        if pool is self._pool and (old is None or new is None):
            self._wake.set()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            while True:
                self._wake.clear()
                self._sync(group)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._pool.config.health.interval):
                        await self._wake.wait()

    def _sync(self, group: asyncio.TaskGroup) -> None:
        current = self._pool.backends
        for backend_id in [i for i in self._tasks if i not in current]:
            self._tasks.pop(backend_id).cancel()
            self._health.pop(backend_id, None)
        for backend_id in current:
            if backend_id not in self._tasks:
                name = f"health:{self._pool.name}/{backend_id}"
                self._tasks[backend_id] = group.create_task(self._check_loop(backend_id), name=name)

    # -- per backend ---------------------------------------------------------
    async def _check_loop(self, backend_id: str) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + random.uniform(0.0, self._pool.config.health.interval)
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            config = self._pool.config.health
            next_at = max(next_at + config.interval, loop.time())
            backend = self._pool.backends.get(backend_id)
            if backend is None:
                continue  # removed; the supervisor cancels this task
            try:
                if config.check == "none":
                    self._passive_recovery(backend, config)
                else:
                    await self._check_once(backend, config)
            except Exception:  # an observer's bug must not stop the health checks
                log.exception("pool %s backend %s: health check", self._pool.name, backend_id)

    async def _check_once(self, backend: Backend, config: HealthConfig) -> None:
        started = time.monotonic()
        try:
            reason = await run_check(config, backend.address)
        except OutOfResources as exc:  # not the backend's failure (nor a pass)
            self._stats.health_checks[(self._pool.name, backend.id, "skipped")] += 1
            log.debug("pool %s backend %s: check skipped: %s", self._pool.name, backend.id, exc)
            return
        self._stats.health_check_seconds.observe(time.monotonic() - started)
        if self._pool.backends.get(backend.id) is backend:
            self._record(backend, config, reason)

    def _state_for(self, backend: Backend) -> _BackendHealth:
        health = self._health.get(backend.id)
        if health is None or health.backend is not backend or health.last_state != backend.state:
            # New backend, new instance of the id, or its state changed since the last check
            # (passive failure, admin, registry): count from zero.
            health = _BackendHealth(backend, backend.state)
            self._health[backend.id] = health
        return health

    def _record(self, backend: Backend, config: HealthConfig, reason: str | None) -> None:
        health = self._state_for(backend)
        result = "pass" if reason is None else "fail"
        self._stats.health_checks[(self._pool.name, backend.id, result)] += 1
        if reason is None:
            health.passes += 1
            health.failures = 0
            if backend.state is BackendState.DOWN and health.passes >= config.rise:
                why = f"{config.check} check passed {health.passes} times"
                self._pool.mark_up(backend.id, why)
        else:
            health.failures += 1
            health.passes = 0
            log.debug("pool %s backend %s: %s", self._pool.name, backend.id, reason)
            if backend.state is BackendState.UP and health.failures >= config.fall:
                self._pool.mark_down(backend.id, reason)
        if health.last_state is not backend.state:
            self._health[backend.id] = _BackendHealth(backend, backend.state)

    def _passive_recovery(self, backend: Backend, config: HealthConfig) -> None:
        health = self._state_for(backend)
        if backend.state is not BackendState.DOWN:
            return
        health.down_ticks += 1
        if health.down_ticks >= 2:
            why = f"retrying after {config.interval}s down (no active health check)"
            self._pool.mark_up(backend.id, why)


# -- the checks ------------------------------------------------------------------
@dataclass(slots=True)
class _Probe:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    host: str  # Host header value: "127.0.0.1:9001", "[::1]:9001"
    path: str
    deadline: float  # loop time at which the whole check times out


async def run_check(config: HealthConfig, address: Address) -> str | None:
    """Run one check of ``config.check`` against ``address``: None on pass, else the reason.
    OutOfResources when lbproxy has no file descriptor (or memory) to make the check with."""
    checks = {"tcp": _check_tcp, "http": _check_http, "websocket": _check_websocket}
    check = checks.get(config.check)
    if check is None:
        return None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(config.timeout) as scope:
            reader, writer = await asyncio.open_connection(address.host, address.port)
            deadline = scope.when() or 0.0
            await check(_Probe(reader, writer, str(address), config.path, deadline))
    except TimeoutError:
        return f"timeout after {config.timeout}s"
    except ConnectionRefusedError:
        return "connect refused"
    except CheckFailed as exc:
        return str(exc)
    except h11.ProtocolError as exc:
        return f"bad http response: {exc}"
    except OSError as exc:
        if exc.errno in LOCAL_ERRORS:
            raise OutOfResources(exc.strerror or str(exc)) from exc
        return f"connection error: {exc.strerror or exc}"
    except Exception as exc:  # any other way of not completing the check is a failure
        return f"check error: {type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.transport.abort()
    return None


async def _check_tcp(probe: _Probe) -> None:
    """Connecting was the check."""


async def _check_http(probe: _Probe) -> None:
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", probe.host), ("User-Agent", "lbproxy-health"), ("Connection", "close")]
    probe.writer.write(
        conn.send(h11.Request(method="GET", target=probe.path, headers=headers)) or b""
    )
    probe.writer.write(conn.send(h11.EndOfMessage()) or b"")
    status = 0
    received = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await probe.reader.read(65536)
            received += len(data)
            if not data and not status:
                raise CheckFailed("connection closed before response")
            if status and (not data or received > MAX_BODY):
                break  # the head was enough; do not wait for a huge or unterminated body
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if not 200 <= status < 400:
        raise CheckFailed(f"http {status}")


async def _ws_events(ws: WSConnection, probe: _Probe) -> list[object]:
    data = await probe.reader.read(65536)
    if not data:
        raise CheckFailed("websocket: connection closed by the backend")
    ws.receive_data(data)
    events: list[object] = []
    for event in ws.events():
        if isinstance(event, Ping):
            probe.writer.write(ws.send(event.response()))
        events.append(event)
    return events


async def _check_websocket(probe: _Probe) -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    probe.writer.write(ws.send(Request(host=probe.host, target=probe.path)))
    accepted = False
    while not accepted:
        for event in await _ws_events(ws, probe):
            if isinstance(event, RejectConnection):
                raise CheckFailed(f"websocket rejected: http {event.status_code}")
            accepted = accepted or isinstance(event, AcceptConnection)
    probe.writer.write(ws.send(Ping(PING_PAYLOAD)))
    ponged = False
    while not ponged:
        for event in await _ws_events(ws, probe):
            if isinstance(event, CloseConnection):
                raise CheckFailed(f"websocket closed by the backend: {event.code}")
            ponged = ponged or (isinstance(event, Pong) and event.payload == PING_PAYLOAD)
    # Passed. Close cleanly, but a backend slow to answer the close does not fail the check.
    probe.writer.write(ws.send(CloseConnection(code=1000)))
    margin = min(0.05, (probe.deadline - asyncio.get_running_loop().time()) / 2)
    with contextlib.suppress(TimeoutError, CheckFailed, OSError):
        async with asyncio.timeout_at(probe.deadline - margin):
            while not any(isinstance(e, CloseConnection) for e in await _ws_events(ws, probe)):
                pass
