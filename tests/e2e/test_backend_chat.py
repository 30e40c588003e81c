"""The chat over a real redis-server: fan-out across backends, history, dedupe, presence, limits."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from lbproxy.backend.server import BackendOptions
from lbproxy.config.types import Address
from tests.support import RedisServer
from tests.support.backend import (
    ChatClient,
    CuttableProxy,
    backend_process,
    running_backend,
    whoami,
)

Opener = Callable[..., Awaitable[ChatClient]]


@pytest.fixture
async def open_chat() -> AsyncIterator[Opener]:
    """Opens ChatClients and closes them all when the test ends."""
    opened: list[ChatClient] = []

    async def open_(
        address: Address, user: str | None = "u", cookie: str | None = None
    ) -> ChatClient:
        client = await ChatClient.open(address, user, cookie)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        await client.close()


FAST = {"rate": 1e6, "burst": 1_000_000}  # no rate limiting in tests that are about other things


def options(redis: RedisServer | str, **extra: Any) -> BackendOptions:
    url = redis if isinstance(redis, str) else redis.url
    values: dict[str, Any] = {"redis_url": url, "prefix": "t", **FAST, **extra}
    return BackendOptions(Address("127.0.0.1", 0), **values)


@contextlib.asynccontextmanager
async def two_backends(redis: RedisServer, **extra: Any) -> AsyncIterator[tuple[Address, Address]]:
    async with (
        running_backend(options(redis, id="A", **extra)) as a,
        running_backend(options(redis, id="B", **extra)) as b,
    ):
        yield a, b


async def test_two_backends_exchange_1000_messages_in_order_exactly_once(
    redis: RedisServer, open_chat: Opener
) -> None:
    async with two_backends(redis) as (a, b):
        alice = await open_chat(a, "alice")
        bob = await open_chat(b, "bob")
        assert (await alice.join("lobby"))["backend"] == "A"
        assert (await bob.join("lobby"))["backend"] == "B"

        async def talk(client: ChatClient, name: str) -> None:
            for i in range(500):
                await client.say("lobby", f"{name}-{i}")

        started = time.monotonic()
        got_alice, got_bob, _, _ = await asyncio.gather(
            alice.messages(1000, timeout=40),
            bob.messages(1000, timeout=40),
            talk(alice, "alice"),
            talk(bob, "bob"),
        )
        elapsed = time.monotonic() - started
        print(f"1000 messages through 2 backends in {elapsed:.2f}s")
        for got in (got_alice, got_bob):
            ids = [m["id"] for m in got]
            assert ids == sorted(set(ids)), "ids must strictly increase: in order, no duplicates"
            for name in ("alice", "bob"):
                texts = [m["text"] for m in got if m["from"] == name]
                assert texts == [f"{name}-{i}" for i in range(500)]
        assert got_alice == got_bob
        await alice.nothing_for(0.3)
        await bob.nothing_for(0.1)


async def test_duplicate_client_msg_id_is_stored_once(
    redis: RedisServer, open_chat: Opener
) -> None:
    async with two_backends(redis) as (a, b):
        alice, bob = await open_chat(a, "alice"), await open_chat(b, "bob")
        await alice.join("r")
        await bob.join("r")
        await alice.say("r", "hello", "c-1")
        (first,) = await alice.messages(1)
        assert (await bob.messages(1))[0] == first
        await alice.say("r", "hello again?", "c-1")  # a retry after a lost ack
        again = await alice.recv()
        assert again == {**first, "duplicate": True}
        await bob.nothing_for(0.5)
        await bob.say("r", "same id, other user", "c-1")  # dedupe is per user
        assert (await bob.messages(1))[0]["text"] == "same id, other user"
        client = aioredis.Redis.from_url(redis.url)
        try:
            assert await client.xlen("t:chat:room:r:stream") == 2
        finally:
            await client.aclose()


async def test_join_since_replays_then_goes_live_and_gap_is_reported(
    redis: RedisServer, open_chat: Opener
) -> None:
    async with two_backends(redis, history=5) as (a, b):
        writer = await open_chat(a, "w")
        for i in range(8):
            await writer.say("r", f"m{i}")
        # not a member: each send is answered with its msg directly
        sent = await writer.messages(8)
        ids = [m["id"] for m in sent]
        assert ids == sorted(ids)

        reader = await open_chat(b, "r")
        await reader.join("r", since=ids[4])  # m5.. are retained: no gap
        assert [m["text"] for m in await reader.messages(3)] == ["m5", "m6", "m7"]
        await writer.say("r", "live")
        assert [m["text"] for m in await reader.messages(1)] == ["live"]

        late = await open_chat(b, "late")
        joined = await late.join("r", since=ids[1])  # m2 was trimmed (history=5: m4..live)
        gap = await late.recv()
        assert gap.pop("epoch") == joined["epoch"]
        assert gap == {"op": "history_gap", "room": "r", "reason": "trimmed", "oldest": ids[4]}
        assert [m["text"] for m in await late.messages(5)] == ["m4", "m5", "m6", "m7", "live"]

        live_only = await open_chat(a, "l")
        await live_only.join("r")  # no since: live messages only
        await live_only.nothing_for(0.3)


async def test_no_gap_or_duplicate_at_the_replay_seam(
    redis: RedisServer, open_chat: Opener
) -> None:
    """Joins with since=0 while another backend publishes continuously."""
    async with two_backends(redis) as (a, b):
        writer = await open_chat(a, "w")
        await writer.join("seam")
        total = 400

        async def write() -> None:
            for i in range(total):
                await writer.say("seam", str(i))
                if i % 50 == 0:
                    await asyncio.sleep(0.01)

        async def join_late(delay: float) -> list[dict[str, Any]]:
            await asyncio.sleep(delay)
            reader = await open_chat(b, f"r{delay}")
            await reader.join("seam", since=0)
            return await reader.messages(total, timeout=40)

        results = await asyncio.gather(
            write(), writer.messages(total, timeout=40), *(join_late(d) for d in (0.05, 0.2, 0.4))
        )
        for got in results[2:]:
            assert [m["text"] for m in got] == [str(i) for i in range(total)]


async def test_presence_across_backends_and_expiry_after_sigkill(
    redis: RedisServer, open_chat: Opener
) -> None:
    proc, b = backend_process(redis_url=redis.url, prefix="t", id="B", presence_ttl=2.0)
    try:
        async with running_backend(options(redis, id="A", presence_ttl=2.0)) as a:
            alice, bob = await open_chat(a, "alice"), await open_chat(b, "bob")
            await alice.join("p")
            await bob.join("p")
            await alice.send(op="presence", room="p")
            assert await alice.recv() == {"op": "presence", "room": "p", "users": ["alice", "bob"]}
            await asyncio.sleep(2.5)  # past one TTL: refreshed by both backends
            await alice.send(op="presence", room="p")
            assert (await alice.recv())["users"] == ["alice", "bob"]

            proc.signal(signal.SIGKILL)
            killed = time.monotonic()
            while True:
                await alice.send(op="presence", room="p")
                users = (await alice.recv())["users"]
                if users == ["alice"]:
                    break
                assert time.monotonic() - killed < 4, users
                await asyncio.sleep(0.1)
            print(f"bob left presence {time.monotonic() - killed:.2f}s after SIGKILL (ttl 2s)")

            await alice.send(op="leave", room="p")
            assert await alice.recv() == {"op": "left", "room": "p"}
            await alice.send(op="presence", room="p")
            assert (await alice.recv())["users"] == []
    finally:
        proc.stop()


async def test_rate_limit_burst_then_usable(redis: RedisServer, open_chat: Opener) -> None:
    async with running_backend(options(redis, rate=5.0, burst=3)) as a:
        c = await open_chat(a, "fast")
        for i in range(6):
            await c.say("rl", f"m{i}")
        events = [await c.recv() for _ in range(6)]
        assert [e["op"] for e in events] == ["msg"] * 3 + ["error"] * 3
        limited = events[3]
        assert limited["code"] == "rate_limited" and limited["client_msg_id"] == "m3"
        assert 0 < limited["retry_after"] <= 0.2 + 1e-3
        await asyncio.sleep(limited["retry_after"])
        await c.say("rl", "after")
        assert (await c.recv())["text"] == "after"
        other = await open_chat(a, "other")  # limits are per user
        await other.say("rl", "x")
        assert (await other.recv())["op"] == "msg"


async def test_bad_messages_are_answered_and_connection_kept(
    redis: RedisServer, open_chat: Opener
) -> None:
    async with running_backend(options(redis, max_message=1000)) as a:
        c = await open_chat(a, "u")
        await c.ws.send("{not json")
        assert (await c.recv())["code"] == "bad_request"
        await c.ws.send(b"\x00binary")
        assert (await c.recv())["code"] == "bad_request"
        await c.send(op="send", room="r", text="x" * 2000, client_msg_id="big")
        event = await c.recv()
        assert event["code"] == "bad_request" and "limit" in event["detail"]
        for bad in ({"op": "dance"}, {"op": "join"}, {"op": "join", "room": "r", "since": -1}):
            await c.send(**bad)
            assert (await c.recv())["code"] == "bad_request", bad
        await c.join("r")
        await c.say("r", "still here")
        assert (await c.messages(1))[0]["text"] == "still here"
        assert (await whoami(a))["connections"] == 1


async def test_session_cookie_is_reused_on_reconnect(redis: RedisServer, open_chat: Opener) -> None:
    async with running_backend(options(redis)) as a:
        first = await open_chat(a, "carol")
        assert first.ws.response is not None
        cookie = first.ws.response.headers["set-cookie"]
        assert cookie.startswith("session=") and "HttpOnly" in cookie
        await first.close()
        again = await open_chat(a, None, cookie=cookie.split(";")[0])
        assert (await again.join("r"))["user"] == "carol"
        with pytest.raises(InvalidStatus) as info:
            await open_chat(a, None)
        assert info.value.response.status_code == 400


async def test_subscription_recovers_and_catches_up_after_a_cut(
    redis: RedisServer, open_chat: Opener
) -> None:
    """A's Redis link is cut while B keeps publishing: A's members get everything after."""
    proxy = await CuttableProxy(Address("127.0.0.1", redis.port)).start()
    try:
        async with (
            running_backend(options(proxy.url, id="A")) as a,
            running_backend(options(redis, id="B")) as b,
        ):
            alice, bob = await open_chat(a, "alice"), await open_chat(b, "bob")
            await alice.join("r")
            await bob.join("r")
            await bob.say("r", "before")
            assert (await alice.messages(1))[0]["text"] == "before"
            await proxy.cut()
            await alice.say("r", "while cut")
            assert (await alice.recv())["code"] == "unavailable"
            for i in range(50):
                await bob.say("r", f"during-{i}")
            await bob.messages(51)
            await proxy.restore()
            got = await alice.messages(50, timeout=20)
            assert [m["text"] for m in got] == [f"during-{i}" for i in range(50)]
            await bob.say("r", "after")
            assert (await alice.messages(1))[0]["text"] == "after"
    finally:
        await proxy.stop()


async def test_redis_killed_and_restarted_under_running_backends(open_chat: Opener) -> None:
    redis = RedisServer().start()
    try:
        async with two_backends(redis) as (a, b):
            alice, bob = await open_chat(a, "alice"), await open_chat(b, "bob")
            await alice.join("r")
            await bob.join("r")
            await bob.say("r", "before")
            (before,) = await alice.messages(1)
            await bob.messages(1)
            redis.kill()
            await bob.say("r", "down")
            assert (await bob.recv())["code"] == "unavailable"
            redis = RedisServer(port=redis.port).start()  # empty: nothing was persisted
            stored = await _send_until_stored(bob, 30)
            gap = await alice.recv(timeout=20)  # the room's data is gone: a new epoch
            assert (gap["op"], gap["reason"]) == ("history_gap", "epoch"), gap
            got = await alice.messages(len(stored), timeout=20)
            assert [m["text"] for m in got] == [m["text"] for m in stored]
            assert got[0]["id"] > before["id"]  # ids still increase after Redis lost its data
            print(f"after the restart: {len(stored)} stored, {len(got)} delivered, 0 lost")
    finally:
        redis.stop()


async def _send_until_stored(client: ChatClient, count: int) -> list[dict[str, Any]]:
    """Send count messages, each retried on "unavailable" until stored; the stored msgs."""
    stored: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    i = 0
    while len(stored) < count:
        assert time.monotonic() < deadline, "redis did not come back"
        await client.say("r", f"after-{i}")
        event = await client.recv()
        if event["op"] == "history_gap":  # a member, told that Redis lost its data
            assert event["reason"] == "epoch", event
            event = await client.recv()
        if event["op"] == "msg":
            stored.append(event)
            i += 1
        else:
            assert event["code"] == "unavailable", event
            await asyncio.sleep(0.05)
    return stored


async def test_message_rate_of_one_backend(redis: RedisServer, open_chat: Opener) -> None:
    """Simple throughput measurement: 4 senders, 1 receiver, all on one backend."""
    async with running_backend(options(redis)) as a:
        receiver = await open_chat(a, "rx")
        await receiver.join("bench")
        senders = [await open_chat(a, f"tx{i}") for i in range(4)]
        per_sender = 500

        async def blast(client: ChatClient, n: int) -> None:
            for i in range(per_sender):
                await client.say("bench", f"{n}-{i}")

        async def acks(client: ChatClient) -> None:  # non-members get their msg back directly
            await client.messages(per_sender, timeout=50)

        started = time.monotonic()
        await asyncio.gather(
            receiver.messages(4 * per_sender, timeout=50),
            *(blast(c, n) for n, c in enumerate(senders)),
            *(acks(c) for c in senders),
        )
        rate = 4 * per_sender / (time.monotonic() - started)
        print(f"one backend: {rate:.0f} chat messages/s stored, published and delivered")
        assert rate > 100


def test_options_are_frozen_and_defaults_match_the_spec() -> None:
    opts = BackendOptions(Address("127.0.0.1", 0))
    assert (opts.max_message, opts.history, opts.rate, opts.burst) == (65536, 100_000, 20.0, 40)
    with pytest.raises(AttributeError):
        opts.rate = 1.0  # type: ignore[misc]
    assert replace(opts, rate=2.0).rate == 2.0


async def test_whoami_counts_chat_connections(redis: RedisServer, open_chat: Opener) -> None:
    async with running_backend(options(redis)) as a:
        clients = [await open_chat(a, f"u{i}") for i in range(3)]
        assert (await whoami(a))["connections"] == 3
        for c in clients:
            await c.close()
        deadline = time.monotonic() + 5
        while (await whoami(a))["connections"] != 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)


async def test_rejoin_replays_from_the_new_since_and_keeps_presence(
    redis: RedisServer, open_chat: Opener
) -> None:
    async with running_backend(options(redis)) as a:
        c = await open_chat(a, "re")
        await c.join("r")
        for i in range(3):
            await c.say("r", f"m{i}")
        first = await c.messages(3)
        await c.join("r", since=first[0]["id"])  # again, from the first message
        assert [m["text"] for m in await c.messages(2)] == ["m1", "m2"]
        await c.send(op="presence", room="r")
        assert (await c.recv())["users"] == ["re"]
        await c.say("r", "live")
        assert [m["text"] for m in await c.messages(1)] == ["live"]
        await c.nothing_for(0.3)
