"""Chat history across failures (README "The reference chat backend"): time/count retention, epochs,
gaps, soak.

Real redis-server processes; backends in this process (``running_backend``) where the test is
about the chat logic, ``lbproxy backend`` subprocesses where it is about the command line or
process failures; the bounded fault run goes through a real ``lbproxy serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from bench.chat_soak import Params, run_soak
from lbproxy.backend import chat_protocol as proto
from lbproxy.backend.history import gap_reason
from lbproxy.backend.server import BackendOptions
from lbproxy.backend.store import Entry, View
from lbproxy.config.types import Address
from tests.support import Backend, RedisServer
from tests.support.backend import ChatClient, CuttableProxy, running_backend

pytestmark = pytest.mark.timeout(90)

Opener = Callable[..., Awaitable[ChatClient]]
FAST = {"rate": 1e6, "burst": 1_000_000}


@pytest.fixture
async def open_chat() -> AsyncIterator[Opener]:
    opened: list[ChatClient] = []

    async def open_(address: Address | str, user: str) -> ChatClient:
        if isinstance(address, str):
            host, port = address.rsplit(":", 1)
            address = Address(host, int(port))
        client = await ChatClient.open(address, user)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 3)


def options(url: str, **extra: Any) -> BackendOptions:
    values: dict[str, Any] = {"redis_url": url, "prefix": "res", **FAST, **extra}
    return BackendOptions(Address("127.0.0.1", 0), **values)


async def send_all(client: ChatClient, room: str, texts: list[str]) -> list[dict[str, Any]]:
    """Send ``texts`` (client_msg_id = text) as a non-member: each answered with its msg."""
    for text in texts:
        await client.say(room, text)
    return await client.messages(len(texts))


async def join_full(client: ChatClient, room: str, **fields: Any) -> dict[str, Any]:
    await client.send(op="join", room=room, **fields)
    joined = await client.recv()
    assert joined["op"] == "joined", joined
    return joined


def test_gap_reason_decisions() -> None:
    def view(epoch: str, last: int, *prevs: tuple[int, int]) -> View:
        return View(epoch, last, [Entry(i, p, "") for i, p in prevs])

    assert gap_reason(5, "e1", view("e1", 7, (6, 5), (7, 6))) is None
    assert gap_reason(5, None, view("e1", 7, (6, 5))) is None  # no epoch given: not checked
    assert gap_reason(5, "e0", view("e1", 7, (6, 5))) == "epoch"
    assert gap_reason(5, "e0", view("e1", 0)) == "epoch"  # an empty new epoch is still new
    assert gap_reason(3, "e1", view("e1", 7, (6, 5))) == "trimmed"  # 4..5 are gone
    assert gap_reason(3, "e1", view("e1", 7)) == "trimmed"  # everything after 3 was trimmed
    assert gap_reason(7, "e1", view("e1", 7)) is None  # up to date


def test_ping_and_epoch_parsing() -> None:
    assert proto.parse_command('{"op":"ping"}') == proto.Ping(None)
    assert proto.pong(proto.parse_command('{"op":"ping","id":7}')) == '{"op":"pong","id":7}'  # type: ignore[arg-type]
    assert proto.quick_ping('{"op":"ping","id":"a"}') == proto.Ping("a")
    assert proto.quick_ping('{"op":"send","room":"r","text":"ping"}') is None
    assert proto.quick_ping('{"op":"send","room":"r","text":"\\"ping\\""}') is None
    join = proto.parse_command('{"op":"join","room":"r","since":5,"epoch":"e1"}')
    assert join == proto.Join("r", 5, "e1")
    for bad in ('{"op":"ping","id":[1]}', '{"op":"join","room":"r","since":1,"epoch":3}'):
        with pytest.raises(proto.BadRequest):
            proto.parse_command(bad)


async def test_ping_is_answered_at_once_even_behind_a_slow_join(
    redis: RedisServer, open_chat: Opener
) -> None:
    """A join that waits (Redis unreachable) does not delay the pong: pings skip the queue."""
    proxy = await CuttableProxy(Address("127.0.0.1", redis.port)).start()
    try:
        async with running_backend(options(proxy.url)) as a:
            client = await open_chat(a, "p")
            await client.send(op="ping", id="x")
            assert await client.recv() == {"op": "pong", "id": "x"}
            await proxy.cut()
            await client.send(op="join", room="r")  # waits for a subscription that never comes
            started = time.monotonic()
            await client.send(op="ping", id=2)
            assert await client.recv(timeout=2) == {"op": "pong", "id": 2}
            assert time.monotonic() - started < 1.0
    finally:
        await proxy.stop()


async def test_history_is_kept_by_count(redis: RedisServer, open_chat: Opener) -> None:
    async with running_backend(options(redis.url, history=4)) as a:
        writer = await open_chat(a, "w")
        sent = await send_all(writer, "r", [f"m{i}" for i in range(10)])
        r = aioredis.Redis(port=redis.port, decode_responses=True)
        try:
            assert await r.xlen("res:chat:room:r:stream") == 4
        finally:
            await r.aclose()
        reader = await open_chat(a, "r")
        joined = await join_full(reader, "r", since=0)
        gap = await reader.recv()
        assert gap == {
            "op": "history_gap",
            "room": "r",
            "reason": "trimmed",
            "epoch": joined["epoch"],
            "oldest": sent[6]["id"],
        }
        assert [m["text"] for m in await reader.messages(4)] == ["m6", "m7", "m8", "m9"]


async def test_history_is_kept_by_time(redis: RedisServer, open_chat: Opener) -> None:
    async with running_backend(options(redis.url, history_seconds=1.0)) as a:
        writer = await open_chat(a, "w")
        old = await send_all(writer, "r", ["old0", "old1", "old2"])
        r = aioredis.Redis(port=redis.port, decode_responses=True)
        try:

            async def redis_us() -> int:
                seconds, micros = await r.time()
                return int(seconds) * 1_000_000 + int(micros)

            while await redis_us() < old[-1]["id"] + 1_100_000:  # Redis time, not ours
                await asyncio.sleep(0.05)
            (new,) = await send_all(writer, "r", ["new"])  # trims what is older than 1 s
            assert await r.xlen("res:chat:room:r:stream") == 1
        finally:
            await r.aclose()
        reader = await open_chat(a, "r")
        joined = await join_full(reader, "r", since=old[0]["id"])
        gap = await reader.recv()
        assert (gap["op"], gap["reason"], gap["oldest"]) == ("history_gap", "trimmed", new["id"])
        assert gap["epoch"] == joined["epoch"]
        assert [m["text"] for m in await reader.messages(1)] == ["new"]


async def test_history_limits_from_the_command_line(redis: RedisServer, open_chat: Opener) -> None:
    """`lbproxy backend --history-max 3` keeps the newest 3; the default keeps all 20."""
    url = ["--redis", redis.url, "--prefix", "cli", "--rate", "1000", "--burst", "1000"]
    url += ["--drain-seconds", "0.1"]
    small = Backend("S", None, *url, "--history-max", "3", "--history-seconds", "300").start()
    try:
        writer = await open_chat(small.address, "w")
        sent = await send_all(writer, "r", [f"m{i}" for i in range(20)])
        reader = await open_chat(small.address, "r")
        await join_full(reader, "r", since=sent[0]["id"])
        gap = await reader.recv()
        assert (gap["op"], gap["reason"], gap["oldest"]) == (
            "history_gap",
            "trimmed",
            sent[17]["id"],
        )
        assert [m["text"] for m in await reader.messages(3)] == ["m17", "m18", "m19"]
        await asyncio.gather(writer.close(), reader.close())  # the backend stops at once
    finally:
        small.stop()
    default = Backend("D", None, *url).start()
    try:
        writer = await open_chat(default.address, "w")
        sent = await send_all(writer, "big", [f"m{i}" for i in range(20)])
        reader = await open_chat(default.address, "r")
        await join_full(reader, "big", since=0)
        assert [m["text"] for m in await reader.messages(20)] == [f"m{i}" for i in range(20)]
        await reader.nothing_for(0.2)
        await asyncio.gather(writer.close(), reader.close())
    finally:
        default.stop()


async def test_resume_in_the_same_epoch_replays_exactly_the_missed_messages(
    redis: RedisServer, open_chat: Opener
) -> None:
    async with (
        running_backend(options(redis.url, id="A")) as a,
        running_backend(options(redis.url, id="B")) as b,
    ):
        writer = await open_chat(a, "w")
        reader = await open_chat(b, "r")
        joined = await join_full(reader, "room", since=0)
        await send_all(writer, "room", ["a0", "a1", "a2"])
        seen = await reader.messages(3)
        await reader.close()
        missed = await send_all(writer, "room", [f"b{i}" for i in range(5)])
        again = await open_chat(a, "r")  # the other backend this time
        rejoined = await join_full(again, "room", since=seen[-1]["id"], epoch=joined["epoch"])
        assert rejoined["epoch"] == joined["epoch"]
        assert await again.messages(5) == missed  # exactly those, in order, no gap before
        await again.nothing_for(0.3)


async def test_redis_data_loss_gives_every_resuming_client_an_epoch_gap(
    open_chat: Opener,
) -> None:
    """Stop Redis, start a fresh empty one on the same port: resumes get reason "epoch"."""
    server = RedisServer().start()
    extra = ["--redis", server.url, "--prefix", "loss", "--rate", "1000", "--burst", "1000"]
    extra += ["--drain-seconds", "0.1"]
    backends = [Backend(f"L{i}", None, *extra) for i in range(2)]
    await asyncio.gather(*(asyncio.to_thread(b.start) for b in backends))  # both at once
    try:
        writer = await open_chat(backends[0].address, "w")
        readers = [await open_chat(backends[i % 2].address, f"r{i}") for i in range(4)]
        epochs = [(await join_full(c, "room", since=0))["epoch"] for c in readers]
        assert len(set(epochs)) == 1
        before = await send_all(writer, "room", ["x0", "x1", "x2"])
        last_ids = [(await c.messages(3))[-1]["id"] for c in readers]
        assert last_ids == [before[-1]["id"]] * 4
        for c in readers:
            await c.close()
        server.kill()
        server = RedisServer(port=server.port).start()  # empty: the data is lost
        after = None
        while after is None:  # the writer's backend reconnects to the new Redis
            await writer.say("room", "y0")
            event = await writer.recv()
            after = event if event["op"] == "msg" else None
            assert after is not None or event.get("code") == "unavailable", event
            if after is None:
                await asyncio.sleep(0.05)
        for i, epoch in enumerate(epochs):
            client = await open_chat(backends[i % 2].address, f"r{i}")
            joined = await join_full(client, "room", since=last_ids[i], epoch=epoch)
            assert joined["epoch"] != epoch
            gap = await client.recv()
            assert gap == {
                "op": "history_gap",
                "room": "room",
                "reason": "epoch",
                "epoch": joined["epoch"],
            }
            assert [m["text"] for m in await client.messages(1)] == ["y0"]  # the new epoch
            await client.close()
        await writer.close()  # the backends stop at once
    finally:
        for backend in backends:
            backend.stop()
        server.stop()


async def test_a_backend_whose_catch_up_was_trimmed_sends_history_gap(
    redis: RedisServer, open_chat: Opener
) -> None:
    """A's Redis link is cut while B stores 30 messages, 10 kept: A's members are told."""
    proxy = await CuttableProxy(Address("127.0.0.1", redis.port)).start()
    try:
        async with (
            running_backend(options(proxy.url, id="A", history=10)) as a,
            running_backend(options(redis.url, id="B", history=10)) as b,
        ):
            alice, bob = await open_chat(a, "alice"), await open_chat(b, "bob")
            joined = await join_full(alice, "r")
            await join_full(bob, "r")
            await bob.say("r", "before")
            assert (await alice.messages(1))[0]["text"] == "before"
            await proxy.cut()
            for i in range(30):
                await bob.say("r", f"during-{i}")
            during = await bob.messages(31)
            await proxy.restore()
            gap = await alice.recv(timeout=20)
            assert gap == {
                "op": "history_gap",
                "room": "r",
                "reason": "trimmed",
                "epoch": joined["epoch"],
                "oldest": during[-10]["id"],
            }
            got = await alice.messages(10, timeout=20)
            assert [m["text"] for m in got] == [f"during-{i}" for i in range(20, 30)]
    finally:
        await proxy.stop()


async def test_bounded_fault_run_loses_duplicates_and_reorders_nothing() -> None:
    """10 clients for 5 s through lbproxy: a backend SIGKILL and a Redis restart (AOF on)."""
    params = Params(
        clients=10,
        rate=10.0,
        duration=5.0,
        backends=2,
        room_size=5,
        faults=("kill", "redis"),
        settle=10.0,
    )
    started = time.monotonic()
    result = await run_soak(params)
    print(result.as_json(), f"\nin {time.monotonic() - started:.1f}s", file=sys.stderr)
    t = result.tally
    assert t.stored > 0.8 * params.clients * params.rate * params.duration
    assert t.reconnects >= 1 and t.unavailable >= 1, "both faults must have hit clients"
    assert (t.lost, t.duplicated, t.reordered, t.gaps) == (0, 0, 0, 0)
    assert t.delivered == t.expected
