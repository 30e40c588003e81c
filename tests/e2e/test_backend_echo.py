"""The reference backend over real sockets: HTTP routes, /echo, whoami, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import h11
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from lbproxy.backend.routes import slow_body
from lbproxy.backend.server import BackendOptions
from lbproxy.config.types import Address
from lbproxy.registry.schema import backend_key, members_key
from tests.support import RedisServer, await_until, port_open
from tests.support.backend import (
    backend_process,
    get,
    healthz,
    http_exchange,
    running_backend,
    whoami,
)


def ws_url(address: Address, path: str) -> str:
    return f"ws://{address}{path}"


def connect(address: Address, path: str = "/echo") -> websockets.connect:
    return websockets.connect(ws_url(address, path), max_size=None, compression=None)


SIZES = [1, 125, 126, 65_535, 65_536, 300_000, 1 << 20]


async def test_echo_text_and_binary_1b_to_1mib() -> None:
    async with running_backend() as address, connect(address) as ws:
        for size in SIZES:
            binary = bytes(i % 256 for i in range(size))
            await ws.send(binary)
            assert await ws.recv() == binary
            text = ("aé€" * (size // 3 + 1))[:size]
            await ws.send(text)
            assert await ws.recv() == text


async def test_echo_many_concurrent_clients_in_order() -> None:
    async with running_backend() as address:

        async def client(n: int) -> None:
            async with connect(address) as ws:
                for i in range(20):
                    await ws.send(f"{n}:{i}")
                for i in range(20):
                    assert await ws.recv() == f"{n}:{i}"

        await asyncio.gather(*(client(n) for n in range(200)))


async def test_whoami_counts_open_websockets() -> None:
    async with running_backend(BackendOptions(Address("127.0.0.1", 0), id="alpha")) as address:
        assert await whoami(address) == {"id": "alpha", "connections": 0}
        sockets = [await connect(address) for _ in range(5)]
        assert (await whoami(address))["connections"] == 5
        for ws in sockets[:2]:
            await ws.close()

        async def three() -> bool:
            return bool((await whoami(address))["connections"] == 3)

        deadline = time.monotonic() + 5
        while not await three():
            assert time.monotonic() < deadline, await whoami(address)
            await asyncio.sleep(0.02)
        for ws in sockets[2:]:
            await ws.close()


async def test_default_id_is_backend_and_bound_port() -> None:
    async with running_backend() as address:
        assert (await whoami(address))["id"] == f"backend-{address.port}"


async def test_http_routes_on_one_keep_alive_connection() -> None:
    async with running_backend() as address:
        body = b"x" * 100_000
        post = h11.Request(
            method="POST",
            target="/echo-body",
            headers=[("host", "t"), ("transfer-encoding", "chunked"), ("content-type", "a/b")],
        )
        responses = await http_exchange(
            address,
            [
                get("/healthz"),
                get("/headers", ("x-forwarded-for", "10.1.2.3")),
                get("/slow?bytes=200000&chunk=7000"),
                (post, body),
                get("/nope"),
                get("/"),
            ],
        )
        statuses = [r[0] for r in responses]
        assert statuses == [200, 200, 200, 200, 404, 200]
        assert responses[0][2] == b"ok"
        assert ["x-forwarded-for", "10.1.2.3"] in json.loads(responses[1][2])
        assert responses[2][1].get("transfer-encoding") == "chunked"
        assert responses[2][2] == slow_body(0, 200_000)
        assert (responses[3][2], responses[3][1]["content-type"]) == (body, "a/b")
        assert b"<html" in responses[5][2].lower()


async def test_slow_large_body_with_a_slow_reader() -> None:
    """4 MiB streamed while the client reads slowly: flow control, nothing lost or reordered."""
    async with running_backend() as address:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(b"GET /slow?bytes=4194304 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        await asyncio.sleep(0.2)  # let the server fill its buffers before we read anything
        raw = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        head, _, _ = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        client = h11.Connection(h11.CLIENT)
        client.send(get("/slow"))
        client.send(h11.EndOfMessage())
        client.receive_data(raw)
        client.receive_data(b"")
        body = bytearray()
        while not isinstance(event := client.next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += event.data
        assert bytes(body) == slow_body(0, 4 << 20)


async def test_upgrades_to_unknown_paths_and_chat_without_redis_are_refused() -> None:
    async with running_backend() as address:
        with pytest.raises(InvalidStatus) as info:
            await connect(address, "/nope")
        assert info.value.response.status_code == 404
        with pytest.raises(InvalidStatus) as info:
            await connect(address, "/chat?user=a")
        assert info.value.response.status_code == 503
        async with connect(address) as ws:  # still serving
            await ws.send("ok")
            assert await ws.recv() == "ok"


async def test_cancel_closes_listener_and_clients() -> None:
    async with running_backend() as address:
        ws = await connect(address)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert not port_open(address.port)


def test_sigterm_drains_then_closes_with_1001() -> None:
    proc, address = backend_process(drain_seconds=1.5)
    try:

        async def scenario() -> tuple[int | None, float]:
            async with connect(address) as ws:
                await ws.send("before")
                assert await ws.recv() == "before"
                started = time.monotonic()
                proc.signal(signal.SIGTERM)
                await await_until(lambda: healthz(address.port) == 503, timeout=5)
                with pytest.raises(InvalidStatus) as info:
                    await connect(address)  # no new websockets while draining
                assert info.value.response.status_code == 503
                await ws.send("during")  # open ones keep working during the drain
                assert await ws.recv() == "during"
                with pytest.raises(ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
                return ws.close_code, time.monotonic() - started

        code, elapsed = asyncio.run(scenario())
        assert code == 1001
        assert 1.2 < elapsed < 6, elapsed
        assert proc.wait(timeout=10) == 0
    finally:
        proc.stop()


def test_sigterm_drain_ends_early_when_clients_leave() -> None:
    proc, address = backend_process(drain_seconds=30.0)
    try:

        async def scenario() -> None:
            ws = await connect(address)
            proc.signal(signal.SIGTERM)
            await await_until(lambda: healthz(address.port) == 503, timeout=5)
            await ws.close()

        started = time.monotonic()
        asyncio.run(scenario())
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
    finally:
        proc.stop()


async def test_registration_in_redis_and_draining_state(redis: RedisServer) -> None:
    proc, address = backend_process(
        id="b-reg", redis_url=redis.url, prefix="t", pool="chat", drain_seconds=30.0
    )
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        key = backend_key("t", "chat", "b-reg")

        async def state() -> object:
            return await client.hget(key, "state")

        deadline = time.monotonic() + 5  # registered right after it starts serving
        while await state() != "up":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert await client.hget(key, "address") == str(address)
        assert await client.zscore(members_key("t", "chat"), "b-reg") is not None
        ws = await connect(address)
        proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while await state() != "draining":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await ws.close()
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert await client.exists(key) == 0  # deregistered on exit
    finally:
        await client.aclose()
        proc.stop()
