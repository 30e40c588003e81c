"""Registration and discovery against a real redis-server: joins, leaves, drains, resync."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Callable

import pytest

from lbproxy.config.types import Address, BackendConfig
from lbproxy.core.pool import BackendState, Pool
from lbproxy.errors import RegistryError
from lbproxy.registry.register import Registration, run_register
from lbproxy.registry.schema import backend_key, events_channel, members_key
from tests.support import RedisServer, await_until, free_port
from tests.support.registry import (
    PREFIX,
    make_pool,
    raw_client,
    raw_leave,
    raw_register,
    redis_ids,
    register_proc,
    state_of,
    watching,
)

NO_RESYNC = 600.0  # long enough that only the snapshot, events and expiry timers act


def member_of(pool: Pool, backend_id: str) -> Callable[[], bool]:
    return lambda: backend_id in redis_ids(pool)


async def test_joins_reach_two_watchers_within_2s_and_they_agree(redis: RedisServer) -> None:
    static = (BackendConfig("s1", Address("127.0.0.1", 1)),)
    pool_a = make_pool(balance="hash", static=static)
    pool_b = make_pool(balance="hash", static=static)
    regs = [
        Registration(redis.url, PREFIX, "chat", f"b{i}", f"127.0.0.1:{9000 + i}", weight=i, ttl=5)
        for i in range(1, 4)
    ]
    async with watching(redis.url, {"chat": pool_a}, resync_interval=NO_RESYNC) as watcher_a:
        await await_until(lambda: watcher_a.connected, timeout=5)
        joins = []
        for reg in regs:
            t0 = time.monotonic()
            await reg.start()
            await await_until(member_of(pool_a, reg.backend_id), timeout=2)
            joins.append(time.monotonic() - t0)
        print(f"join latency (event): max {max(joins) * 1000:.1f} ms")
        # A watcher started later gets the same set from its first snapshot.
        async with watching(redis.url, {"chat": pool_b}, resync_interval=NO_RESYNC) as watcher_b:
            await await_until(lambda: watcher_b.connected, timeout=5)
            assert watcher_b.last_sync > 0
            assert set(pool_a.backends) == set(pool_b.backends) == {"s1", "b1", "b2", "b3"}
            for bid in ("b1", "b2", "b3"):
                a, b = pool_a.backends[bid], pool_b.backends[bid]
                assert (a.address, a.weight, a.state) == (b.address, b.weight, b.state)
                assert a.weight == int(bid[1:])
            keys = [f"user-{i}".encode() for i in range(1000)]
            picks_a = [pool_a.pick(k) for k in keys]
            picks_b = [pool_b.pick(k) for k in keys]
            ids_a = [p.id if p else None for p in picks_a]
            assert ids_a == [p.id if p else None for p in picks_b]
            assert len(set(ids_a)) == 4  # every backend takes some keys

            t0 = time.monotonic()
            await regs[0].stop()
            await await_until(lambda: "b1" not in pool_a.backends, timeout=1)
            await await_until(lambda: "b1" not in pool_b.backends, timeout=1)
            print(f"leave latency (deregistration): {(time.monotonic() - t0) * 1000:.1f} ms")
            assert "s1" in pool_a.backends and "s1" in pool_b.backends
    for reg in regs[1:]:
        await reg.stop()


async def test_drain_and_up_again_follow_the_registration(redis: RedisServer) -> None:
    pool = make_pool()
    async with raw_client(redis.url) as client, watching(redis.url, {"chat": pool}) as watcher:
        await await_until(lambda: watcher.connected, timeout=5)
        await raw_register(client, "chat", "x1", "127.0.0.1:7001")
        await await_until(lambda: state_of(pool, "x1") is BackendState.UP, timeout=2)
        await raw_register(client, "chat", "x1", "127.0.0.1:7001", state="draining", event="drain")
        await await_until(lambda: state_of(pool, "x1") is BackendState.DRAINING, timeout=2)
        await raw_register(client, "chat", "x1", "127.0.0.1:7001", event="change")
        await await_until(lambda: state_of(pool, "x1") is BackendState.UP, timeout=2)
        # An admin drain is not undone by a registration that simply stays up.
        assert pool.drain("x1")
        await raw_register(client, "chat", "x1", "127.0.0.1:7001", weight="5", event="change")
        await await_until(lambda: pool.backends["x1"].weight == 5, timeout=2)
        assert state_of(pool, "x1") is BackendState.DRAINING
        # A changed address replaces the backend (the old one drains).
        await raw_register(client, "chat", "x1", "127.0.0.1:7002", event="change")
        await await_until(lambda: pool.backends["x1"].address.port == 7002, timeout=2)
        assert state_of(pool, "x1") is BackendState.UP


async def test_registration_set_draining(redis: RedisServer) -> None:
    pool = make_pool()
    reg = Registration(redis.url, PREFIX, "chat", "d1", "127.0.0.1:7100", meta={"zone": "a"})
    async with watching(redis.url, {"chat": pool}, resync_interval=NO_RESYNC) as watcher:
        await await_until(lambda: watcher.connected, timeout=5)
        await reg.start()
        await await_until(lambda: state_of(pool, "d1") is BackendState.UP, timeout=2)
        async with raw_client(redis.url) as client:
            fields = await client.hgetall(backend_key(PREFIX, "chat", "d1"))
            assert fields["meta:zone"] == "a" and fields["state"] == "up"
            assert 0 < await client.pttl(backend_key(PREFIX, "chat", "d1")) <= 12_000
        await reg.set_draining()
        await await_until(lambda: state_of(pool, "d1") is BackendState.DRAINING, timeout=2)
        await reg.stop()
        await await_until(lambda: "d1" not in pool.backends, timeout=1)


async def test_missed_publish_is_healed_by_resync(redis: RedisServer) -> None:
    pool = make_pool()
    async with (
        raw_client(redis.url) as client,
        watching(redis.url, {"chat": pool}, resync_interval=0.5) as watcher,
    ):
        await await_until(lambda: watcher.connected, timeout=5)
        first_sync = watcher.last_sync
        await raw_register(client, "chat", "quiet", "127.0.0.1:7200", event=None, ttl=1.5)
        await await_until(lambda: "quiet" in redis_ids(pool), timeout=2)
        assert watcher.last_sync > first_sync
        # A leave without its event is a vanished key (docs/registry.md): kept until its TTL passes.
        await raw_leave(client, "chat", "quiet", publish=False)
        sync = watcher.last_sync
        await await_until(lambda: watcher.last_sync > sync, timeout=2)
        assert "quiet" in redis_ids(pool)
        await await_until(lambda: "quiet" not in pool.backends, timeout=3)


async def test_expired_member_leaves_at_its_expiry_and_is_cleaned(redis: RedisServer) -> None:
    pool = make_pool()
    async with (
        raw_client(redis.url) as client,
        watching(redis.url, {"chat": pool}, resync_interval=NO_RESYNC) as watcher,
    ):
        await await_until(lambda: watcher.connected, timeout=5)
        await raw_register(client, "chat", "short", "127.0.0.1:7300", ttl=1.0)
        await raw_register(client, "chat", "long", "127.0.0.1:7301", ttl=60.0)
        await await_until(lambda: redis_ids(pool) == {"short", "long"}, timeout=2)
        t0 = time.monotonic()
        await await_until(lambda: "short" not in pool.backends, timeout=2.0)
        print(f"expiry: gone {time.monotonic() - t0:.2f}s after joining with ttl 1.0s")
        assert redis_ids(pool) == {"long"}
        # The expired member stays in the set (read as expired, so every watcher sees the
        # expiry itself) while its hash lives; the first read after that removes it.
        members = await client.zrange(members_key(PREFIX, "chat"), 0, -1)
        assert members == ["short", "long"]
        async with asyncio.timeout(5):
            while await client.exists(backend_key(PREFIX, "chat", "short")):
                await asyncio.sleep(0.05)
        await raw_register(client, "chat", "next", "127.0.0.1:7302", ttl=60.0)
        await await_until(lambda: "next" in redis_ids(pool), timeout=2)
        members = await client.zrange(members_key(PREFIX, "chat"), 0, -1)
        assert sorted(members) == ["long", "next"]  # removed from the sorted set


async def test_run_register_sigkill_expires_within_ttl(redis: RedisServer) -> None:
    pool = make_pool()
    ttl = 1.5
    async with watching(redis.url, {"chat": pool}, resync_interval=NO_RESYNC) as watcher:
        await await_until(lambda: watcher.connected, timeout=5)
        proc = register_proc(redis.url, "chat", "127.0.0.1:7400", "k1", ttl)
        try:
            await await_until(lambda: "k1" in redis_ids(pool), timeout=15)
            proc.signal(signal.SIGKILL)
            t0 = time.monotonic()
            await await_until(lambda: "k1" not in pool.backends, timeout=ttl + 1)
            print(f"SIGKILL -> gone in {time.monotonic() - t0:.2f}s (ttl {ttl}s)")
        finally:
            proc.stop()


async def test_run_register_sigterm_deregisters_at_once(redis: RedisServer) -> None:
    pool = make_pool()
    async with watching(redis.url, {"chat": pool}, resync_interval=NO_RESYNC) as watcher:
        await await_until(lambda: watcher.connected, timeout=5)
        proc = register_proc(redis.url, "chat", "127.0.0.1:7500", "t1", 30.0)
        try:
            await await_until(lambda: "t1" in redis_ids(pool), timeout=15)
            proc.signal(signal.SIGTERM)
            t0 = time.monotonic()
            await await_until(lambda: "t1" not in pool.backends, timeout=1)
            print(f"SIGTERM -> gone in {(time.monotonic() - t0) * 1000:.0f} ms")
            assert proc.wait(timeout=5) == 0
            assert "deregistered t1" in proc.output()
        finally:
            proc.stop()


async def test_run_register_drain_first(redis: RedisServer) -> None:
    pool = make_pool()
    async with watching(redis.url, {"chat": pool}, resync_interval=NO_RESYNC) as watcher:
        await await_until(lambda: watcher.connected, timeout=5)
        proc = register_proc(redis.url, "chat", "127.0.0.1:7600", "dr", 30.0, drain_first=1.0)
        try:
            await await_until(lambda: state_of(pool, "dr") is BackendState.UP, timeout=15)
            proc.signal(signal.SIGINT)
            await await_until(lambda: state_of(pool, "dr") is BackendState.DRAINING, timeout=1)
            drained_at = time.monotonic()
            await await_until(lambda: "dr" not in pool.backends, timeout=3)
            assert time.monotonic() - drained_at >= 0.8  # it stayed registered while draining
            assert proc.wait(timeout=5) == 0
        finally:
            proc.stop()


async def test_run_register_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://app:hunter22@127.0.0.1:{free_port()}/0"
    code = await run_register(url, PREFIX, "chat", "127.0.0.1:1", None, 1, 3.0, 0.0)
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot reach Redis at redis://app:***@127.0.0.1:{url.split(':')[-1]}" in err
    assert "hunter22" not in err
    reg = Registration(url, PREFIX, "chat", "x", "127.0.0.1:1")
    with pytest.raises(RegistryError, match="cannot reach Redis"):
        await reg.start()
    await reg.stop()  # safe after a failed start
    bad = await run_register("redis+sentinel://h:1/m", PREFIX, "chat", "127.0.0.1:1", "i", 1, 3, 0)
    assert bad == 2 and "not supported" in capsys.readouterr().err


async def test_allowed_networks(redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lbproxy.registry.register")
    pool = make_pool(allowed=("10.0.0.0/8", "fd00::/8"))
    async with (
        raw_client(redis.url) as client,
        watching(redis.url, {"chat": pool}, resync_interval=0.3) as watcher,
    ):
        await await_until(lambda: watcher.connected, timeout=5)
        await raw_register(client, "chat", "outside", "127.0.0.1:80")
        await raw_register(client, "chat", "named", "localhost:80")
        await raw_register(client, "chat", "inside", "10.1.2.3:80")
        await raw_register(client, "chat", "inside6", "[fd00::7]:80")
        await await_until(lambda: redis_ids(pool) == {"inside", "inside6"}, timeout=2)
        sync = watcher.last_sync
        await await_until(lambda: watcher.last_sync > sync + 0.5, timeout=3)  # more resyncs
        assert redis_ids(pool) == {"inside", "inside6"}
    denied = [r.getMessage() for r in caplog.records if "allowed_networks" in r.getMessage()]
    assert len(denied) == 2  # once per (pool, id, address), not per resync
    assert any("outside" in m for m in denied) and any("named" in m for m in denied)


async def test_malformed_entries_and_events_are_ignored(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lbproxy.registry.register")
    pool = make_pool()
    async with (
        raw_client(redis.url) as client,
        watching(redis.url, {"chat": pool}, resync_interval=0.3) as watcher,
    ):
        await await_until(lambda: watcher.connected, timeout=5)
        await client.publish(events_channel(PREFIX), "not json")
        await raw_register(client, "chat", "heavy", "127.0.0.1:80", weight="99999")
        await raw_register(client, "chat", "noport", "127.0.0.1", event=None)
        await client.zadd(members_key(PREFIX, "chat"), {"ghost": time.time() + 60})
        await raw_register(client, "chat", "fine", "127.0.0.1:81")
        await await_until(lambda: redis_ids(pool) == {"fine"}, timeout=2)
        sync = watcher.last_sync
        await await_until(lambda: watcher.last_sync > sync + 0.5, timeout=3)
        assert redis_ids(pool) == {"fine"}
        assert watcher.connected
    messages = [r.getMessage() for r in caplog.records]
    for name in ("'heavy'", "'noport'", "'ghost'", "'not json'"):
        assert sum(name in m for m in messages) == 1, (name, messages)


async def test_static_backends_are_never_touched(redis: RedisServer) -> None:
    pool = make_pool(static=(BackendConfig("b1", Address("127.0.0.1", 1)),))
    async with raw_client(redis.url) as client, watching(redis.url, {"chat": pool}) as watcher:
        await await_until(lambda: watcher.connected, timeout=5)
        await raw_register(client, "chat", "b1", "127.0.0.1:2")  # same id as the static one
        await raw_register(client, "chat", "r1", "127.0.0.1:3")
        await await_until(lambda: "r1" in pool.backends, timeout=2)
        assert pool.backends["b1"].address.port == 1 and pool.backends["b1"].source == "static"
        await raw_leave(client, "chat", "b1")
        await raw_leave(client, "chat", "r1")
        await await_until(lambda: "r1" not in pool.backends, timeout=2)
        assert state_of(pool, "b1") is BackendState.UP


async def test_update_pools(redis: RedisServer) -> None:
    chat, other = make_pool("chat"), make_pool("other")
    async with (
        raw_client(redis.url) as client,
        watching(redis.url, {"chat": chat}, resync_interval=NO_RESYNC) as watcher,
    ):
        await await_until(lambda: watcher.connected, timeout=5)
        await raw_register(client, "chat", "c1", "127.0.0.1:1")
        await raw_register(client, "other", "o1", "127.0.0.1:2")
        await await_until(lambda: "c1" in chat.backends, timeout=2)
        assert not other.backends
        watcher.update_pools({"chat": chat, "other": other})
        await await_until(lambda: "o1" in other.backends, timeout=2)
        # chat switched to static discovery by a reload: its redis backends go.
        chat.apply_config(dataclasses.replace(chat.config, discovery="static"))
        watcher.update_pools({"chat": chat, "other": other})
        assert "c1" not in chat.backends
        await raw_register(client, "chat", "c2", "127.0.0.1:3")
        await raw_register(client, "other", "o2", "127.0.0.1:4")
        await await_until(lambda: "o2" in other.backends, timeout=2)
        assert not chat.backends


async def test_leave_of_a_replaced_instance_keeps_the_new_registration(redis: RedisServer) -> None:
    pool = make_pool()
    old = Registration(redis.url, PREFIX, "chat", "same", "127.0.0.1:9101", ttl=60)
    new = Registration(redis.url, PREFIX, "chat", "same", "127.0.0.1:9102", ttl=60)
    async with (
        raw_client(redis.url) as client,
        watching(redis.url, {"chat": pool}, resync_interval=NO_RESYNC) as watcher,
    ):
        await await_until(lambda: watcher.connected, timeout=5)
        await old.start()
        await await_until(lambda: "same" in redis_ids(pool), timeout=2)
        await new.start()  # e.g. a restarted backend that kept its id
        await await_until(lambda: pool.backends["same"].address.port == 9102, timeout=2)
        await old.stop()
        assert await client.hget(backend_key(PREFIX, "chat", "same"), "instance") == new.instance
        assert await client.zscore(members_key(PREFIX, "chat"), "same") is not None
        assert "same" in redis_ids(pool)
        await new.stop()
        await await_until(lambda: "same" not in pool.backends, timeout=1)
