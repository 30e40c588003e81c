"""Active and passive health checks against real tiny servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from lbproxy.config.types import Address, BackendConfig, HealthConfig, PoolConfig
from lbproxy.core.pool import Backend, BackendState, Pool
from lbproxy.ops.health import HealthChecker, run_check
from lbproxy.ops.stats import Stats
from tests.support import await_until, free_port


class TinyServer:
    """A loopback server. Modes: "tcp" accepts and closes; "http" answers ``status``;
    "eof" reads the request and closes without answering; "hang" reads the request and
    never answers; "ws-no-pong" accepts a websocket upgrade (wsproto), then ignores pings."""

    def __init__(self, mode: str = "tcp", status: int = 200, port: int = 0) -> None:
        self.mode = mode
        self.status = status
        self.port = port
        self.accepts: list[float] = []
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._release = asyncio.Event()

    async def start(self) -> TinyServer:
        self._release.clear()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._release.set()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts.append(asyncio.get_running_loop().time())
        self._writers.add(writer)
        try:
            if self.mode == "http":
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                head = f"HTTP/1.1 {self.status} Whatever\r\nContent-Length: 2\r\n\r\nok"
                writer.write(head.encode())
                await writer.drain()
            elif self.mode == "eof":
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            elif self.mode == "hang":
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                await self._release.wait()
            elif self.mode == "ws-no-pong":
                await self._websocket_without_pong(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _websocket_without_pong(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        while not self._release.is_set():
            data = await reader.read(4096)
            if not data:
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    self.requests.append(event.target.encode())
                    writer.write(ws.send(AcceptConnection()))
                # pings are received and deliberately never answered


@contextlib.asynccontextmanager
async def servers(*specs: dict[str, Any]) -> AsyncIterator[list[TinyServer]]:
    started = [await TinyServer(**spec).start() for spec in specs]
    try:
        yield started
    finally:
        for server in started:
            await server.stop()


def make_pool(addresses: dict[str, Address], **health: Any) -> Pool:
    backends = tuple(BackendConfig(id, address) for id, address in addresses.items())
    return Pool(PoolConfig(name="p", backends=backends, health=HealthConfig(**health)))


class Transitions:
    """Records every state change of a pool with the health counters at that moment."""

    def __init__(self, pool: Pool, stats: Stats) -> None:
        self.stats = stats
        self.events: list[tuple[str, str | None, str, int, int]] = []
        pool.subscribe(self._record)

    def _record(
        self,
        pool: Pool,
        backend: Backend,
        old: BackendState | None,
        new: BackendState | None,
        reason: str,
    ) -> None:
        passes = self.stats.health_checks.get((pool.name, backend.id, "pass"), 0)
        fails = self.stats.health_checks.get((pool.name, backend.id, "fail"), 0)
        self.events.append((backend.id, new.value if new else None, reason, passes, fails))

    def last(self, backend_id: str, state: str) -> tuple[str, int, int]:
        for id, new, reason, passes, fails in reversed(self.events):
            if id == backend_id and new == state:
                return reason, passes, fails
        raise AssertionError(f"{backend_id} never became {state}: {self.events}")


@contextlib.asynccontextmanager
async def running(pool: Pool, stats: Stats) -> AsyncIterator[HealthChecker]:
    checker = HealthChecker(pool, stats)
    await checker.start()
    try:
        yield checker
    finally:
        await checker.stop()


def count(stats: Stats, backend_id: str, result: str) -> int:
    return stats.health_checks.get(("p", backend_id, result), 0)


async def test_tcp_check_marks_down_after_fall_and_up_after_rise() -> None:
    async with servers({}, {}) as (a, b):
        pool = make_pool(
            {"a": a.address, "b": b.address}, interval=0.1, timeout=0.5, fall=2, rise=3
        )
        stats = Stats()
        log = Transitions(pool, stats)
        async with running(pool, stats):
            await await_until(lambda: count(stats, "a", "pass") >= 2)
            fails_before = count(stats, "a", "fail")
            await a.stop()
            loop = asyncio.get_running_loop()
            killed = loop.time()
            await await_until(lambda: pool.backends["a"].state is BackendState.DOWN, timeout=1.2)
            assert loop.time() - killed <= 2 * 0.1 + 1.0
            reason, passes_at_down, fails_at_down = log.last("a", "down")
            assert reason == "connect refused"
            assert fails_at_down - fails_before == 2  # exactly `fall` failures
            assert pool.backends["b"].state is BackendState.UP

            await a.start()  # same port again
            await await_until(lambda: pool.backends["a"].state is BackendState.UP, timeout=2.0)
            reason, passes_at_up, _ = log.last("a", "up")
            assert passes_at_up - passes_at_down == 3  # exactly `rise` passes
            assert "passed 3 times" in reason
        assert stats.health_check_seconds.count == sum(stats.health_checks.values())


async def test_http_check_status_codes_and_request() -> None:
    async with servers({"mode": "http", "status": 302}) as (server,):
        pool = make_pool({"a": server.address}, check="http", path="/hc?x=1", interval=0.1, fall=2)
        stats = Stats()
        log = Transitions(pool, stats)
        async with running(pool, stats):
            await await_until(lambda: count(stats, "a", "pass") >= 3)  # 3xx passes
            assert pool.backends["a"].state is BackendState.UP
            head = server.requests[0].decode()
            assert head.startswith("GET /hc?x=1 HTTP/1.1\r\n")
            assert f"host: 127.0.0.1:{server.port}\r\n" in head.lower()

            server.status = 503
            await await_until(lambda: pool.backends["a"].state is BackendState.DOWN, timeout=1.5)
            assert log.last("a", "down")[0] == "http 503"

            server.status = 204
            await await_until(lambda: pool.backends["a"].state is BackendState.UP, timeout=1.5)


async def test_http_timeout_fails_without_slowing_other_backends() -> None:
    async with servers({"mode": "hang"}, {"mode": "http"}) as (slow, fast):
        addresses = {"slow": slow.address, "fast": fast.address}
        pool = make_pool(addresses, check="http", interval=0.1, timeout=0.3, fall=2)
        stats = Stats()
        log = Transitions(pool, stats)
        async with running(pool, stats):
            await await_until(lambda: pool.backends["slow"].state is BackendState.DOWN, timeout=2)
            assert log.last("slow", "down")[0] == "timeout after 0.3s"
            # While each check of "slow" took 0.3 s, "fast" kept its own 0.1 s schedule.
            assert count(stats, "fast", "pass") >= 4
            assert pool.backends["fast"].state is BackendState.UP


async def test_websocket_check_handshake_ping_and_clean_close() -> None:
    paths: list[str] = []
    close_codes: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        paths.append(ws.request.path if ws.request else "")
        await ws.wait_closed()
        close_codes.append(ws.close_code)

    def reject_other_paths(ws: ServerConnection, request: WsRequest) -> WsResponse | None:
        if request.path != "/ws-health":
            return ws.respond(HTTPStatus.NOT_FOUND, "no\n")
        return None

    async with serve(handler, "127.0.0.1", 0, process_request=reject_other_paths) as server:
        port = server.sockets[0].getsockname()[1]
        address = Address("127.0.0.1", port)
        ok = HealthConfig(check="websocket", path="/ws-health", timeout=2.0)
        assert await run_check(ok, address) is None
        await await_until(lambda: close_codes)
        assert paths == ["/ws-health"]
        assert close_codes == [1000]  # we closed cleanly after the pong

        wrong = HealthConfig(check="websocket", path="/elsewhere", timeout=2.0)
        assert await run_check(wrong, address) == "websocket rejected: http 404"

        pool = make_pool({"a": address}, check="websocket", path="/ws-health", interval=0.1)
        stats = Stats()
        async with running(pool, stats):
            await await_until(lambda: count(stats, "a", "pass") >= 3)
            assert count(stats, "a", "fail") == 0
        # and a websocket check of a path the server rejects marks the backend down
        pool = make_pool({"a": address}, check="websocket", path="/nope", interval=0.1, fall=2)
        async with running(pool, Stats()):
            await await_until(lambda: pool.backends["a"].state is BackendState.DOWN, timeout=1.5)


async def test_websocket_check_fails_when_pong_never_comes() -> None:
    async with servers({"mode": "ws-no-pong"}) as (server,):
        config = HealthConfig(check="websocket", path="/x", timeout=0.3)
        assert await run_check(config, server.address) == "timeout after 0.3s"
        assert server.requests == [b"/x"]  # the upgrade itself succeeded


async def test_check_reasons_for_refused_and_non_http() -> None:
    closed = Address("127.0.0.1", free_port())
    assert await run_check(HealthConfig(check="tcp"), closed) == "connect refused"
    assert await run_check(HealthConfig(check="http"), closed) == "connect refused"
    async with servers({"mode": "eof"}) as (server,):
        assert await run_check(HealthConfig(check="tcp"), server.address) is None
        reason = await run_check(HealthConfig(check="http"), server.address)
        assert reason == "connection closed before response"
        reason = await run_check(HealthConfig(check="websocket"), server.address)
        assert reason == "websocket: connection closed by the backend"


async def test_passive_failures_with_check_none() -> None:
    async with servers({}) as (server,):
        pool = make_pool({"a": server.address}, check="none", interval=0.3, passive_failures=3)
        stats = Stats()
        log = Transitions(pool, stats)
        backend = pool.backends["a"]
        async with running(pool, stats):
            pool.connect_failed(backend, "connect refused")
            pool.connect_failed(backend, "connect refused")
            assert backend.state is BackendState.UP
            pool.connect_failed(backend, "connect refused")
            assert backend.state is BackendState.DOWN
            down_at = asyncio.get_running_loop().time()
            # no active checks ran, but the backend gets another chance after an interval
            await await_until(lambda: backend.state is BackendState.UP, timeout=2.0)
            assert asyncio.get_running_loop().time() - down_at >= 0.3
            assert "no active health check" in log.last("a", "up")[0]
            assert not stats.health_checks
            assert server.accepts == []


async def test_passive_down_is_brought_back_by_active_checks() -> None:
    async with servers({}) as (server,):
        pool = make_pool({"a": server.address}, interval=0.1, rise=3, passive_failures=2)
        stats = Stats()
        log = Transitions(pool, stats)
        backend = pool.backends["a"]
        async with running(pool, stats):
            await await_until(lambda: count(stats, "a", "pass") >= 4)  # many passes while up
            pool.connect_failed(backend, "connect timeout")
            pool.connect_failed(backend, "connect timeout")
            assert backend.state is BackendState.DOWN
            _, passes_at_down, _ = log.last("a", "down")
            await await_until(lambda: backend.state is BackendState.UP, timeout=2.0)
            _, passes_at_up, _ = log.last("a", "up")
            assert passes_at_up - passes_at_down == 3  # earlier passes do not count


async def test_draining_backends_are_checked_but_never_changed() -> None:
    dead = Address("127.0.0.1", free_port())
    async with servers({}) as (alive,):
        pool = make_pool({"dead": dead, "alive": alive.address}, interval=0.1, fall=1, rise=1)
        pool.drain("dead")
        pool.drain("alive")
        stats = Stats()
        async with running(pool, stats):
            await await_until(lambda: count(stats, "dead", "fail") >= 3)
            await await_until(lambda: count(stats, "alive", "pass") >= 3)
            assert pool.backends["dead"].state is BackendState.DRAINING
            assert pool.backends["alive"].state is BackendState.DRAINING


async def test_first_checks_are_jittered() -> None:
    specs = [{} for _ in range(20)]
    async with servers(*specs) as started:
        pool = make_pool({f"b{i}": s.address for i, s in enumerate(started)}, interval=1.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with running(pool, Stats()):
            await await_until(lambda: all(s.accepts for s in started), timeout=3.0)
        firsts = sorted(s.accepts[0] - t0 for s in started)
        assert firsts[-1] < 1.0 + 0.3  # all first checks within one interval
        assert firsts[-1] - firsts[0] > 0.4  # spread over it, not in lockstep
        assert len({int(t * 10) for t in firsts}) >= 5


async def test_follows_pool_membership_and_forgets_removed() -> None:
    async with servers({}, {}) as (a, b):
        pool = make_pool({"a": a.address}, interval=0.1)
        stats = Stats()
        async with running(pool, stats) as checker:
            await await_until(lambda: checker.checking == {"a"})
            pool.upsert("b", b.address, 1, source="redis")
            await await_until(lambda: count(stats, "b", "pass") >= 1, timeout=1.0)
            assert checker.checking == {"a", "b"}
            pool.remove("b", "deregistered")
            await await_until(lambda: checker.checking == {"a"}, timeout=1.0)
            await b.stop()  # were it still checked, "b" would now fail
            fails = count(stats, "b", "fail")
            before = count(stats, "a", "pass")
            await await_until(lambda: count(stats, "a", "pass") >= before + 3)
            assert count(stats, "b", "fail") == fails == 0


async def test_reconfigure_to_new_pool_and_settings() -> None:
    async with servers({"mode": "http", "status": 500}, {}) as (a, b):
        first = make_pool({"a": a.address}, interval=0.1)
        stats = Stats()
        async with running(first, stats) as checker:
            await await_until(lambda: count(stats, "a", "pass") >= 1)  # tcp passes
            # reload: a new Pool object, http checks, another backend set
            second = make_pool({"a": a.address, "b": b.address}, check="http", interval=0.1)
            checker.reconfigure(second)
            await await_until(lambda: checker.checking == {"a", "b"}, timeout=1.0)
            await await_until(lambda: second.backends["a"].state is BackendState.DOWN, timeout=2)
            assert first.backends["a"].state is BackendState.UP  # the old pool is left alone
            # settings changed in place (apply_config on the same pool) are picked up too
            config = second.config
            second.apply_config(
                PoolConfig(name="p", backends=config.backends, health=HealthConfig(check="tcp"))
            )
            await await_until(lambda: second.backends["a"].state is BackendState.UP, timeout=4)
        assert checker.checking == frozenset()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_checks_run_on_both_event_loops(loop_kind: str) -> None:
    import uvloop

    async def scenario() -> None:
        async with servers({"mode": "http", "status": 503}) as (server,):
            config = HealthConfig(check="http", timeout=1.0)
            assert await run_check(config, server.address) == "http 503"
            assert await run_check(HealthConfig(check="tcp"), server.address) is None

    if loop_kind == "uvloop":
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(scenario())
    else:
        asyncio.run(scenario())
