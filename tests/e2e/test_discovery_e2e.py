"""End to end: lbproxy instances fed by the Redis registry (real redis-server, real processes)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.support import Backend, Lbproxy, Proc, RedisServer, free_port, lbproxy_cmd, wait_until

pytestmark = pytest.mark.timeout(90)


def config(redis_url: str, allowed: str = '["127.0.0.0/8"]') -> tuple[str, int, int]:
    port, admin = free_port(), free_port()
    text = f"""
[admin]
listen = "127.0.0.1:{admin}"
[redis]
url = "{redis_url}"
prefix = "e2e"
[listeners.public]
bind = "127.0.0.1:{port}"
pool = "chat"
[pools.chat]
balance = "hash"
hash_key = "header:x-user"
hash_balance_factor = 0
discovery = "redis"
allowed_networks = {allowed}
drain_timeout = 0.5
close_spread = 0.1
[pools.chat.health]
check = "http"
interval = 0.5
"""
    return text, port, admin


def members(admin: int) -> dict[str, str]:
    pools = httpx.get(f"http://127.0.0.1:{admin}/api/pools", timeout=2).json()["pools"]
    return {b["id"]: b["state"] for b in pools["chat"]["backends"]}


def register(redis: RedisServer, backend: Backend, *extra: str) -> Proc:
    return Proc(
        lbproxy_cmd(
            "register", "--redis", redis.url, "--prefix", "e2e", "--pool", "chat",
            "--address", backend.address, "--id", backend.id, "--ttl", "2", *extra,
        )
    )  # fmt: skip


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started = [Backend(f"r{i}").start() for i in range(1, 4)]
    yield started
    for b in started:
        b.stop()


def test_two_instances_follow_the_registry_and_agree(
    redis: RedisServer, backends: list[Backend], tmp_path: Path
) -> None:
    text1, port1, admin1 = config(redis.url)
    text2, port2, admin2 = config(redis.url)
    lb1 = Lbproxy(text1, tmp_path, name="a").start(wait_ports=(port1, admin1))
    lb2 = Lbproxy(text2, tmp_path, name="b").start(wait_ports=(port2, admin2))
    regs = []
    try:
        started = time.monotonic()
        regs = [register(redis, b) for b in backends]
        for admin in (admin1, admin2):
            wait_until(lambda a=admin: len(members(a)) == 3, timeout=5)
        assert time.monotonic() - started < 4  # includes the register processes' start-up
        with httpx.Client() as c:
            for i in range(200):
                h = {"X-User": f"user-{i}"}
                a = c.get(f"http://127.0.0.1:{port1}/whoami", headers=h).json()["id"]
                b = c.get(f"http://127.0.0.1:{port2}/whoami", headers=h).json()["id"]
                assert a == b
        # a websocket through the registry-fed pool, then its backend leaves cleanly:
        with ws_connect(f"ws://127.0.0.1:{port1}/echo", additional_headers={"X-User": "u"}) as ws:
            owner = httpx.get(f"http://127.0.0.1:{port1}/whoami", headers={"X-User": "u"}).json()[
                "id"
            ]
            proc = regs[[b.id for b in backends].index(owner)]
            proc.signal(signal.SIGTERM)
            wait_until(lambda: owner not in members(admin1), timeout=5)
            # the open connection drained with 1001 rather than being cut
            with pytest.raises(Exception) as info:
                ws.recv(timeout=5)
            assert getattr(getattr(info.value, "rcvd", None), "code", None) == 1001
        # Redis goes away: both instances keep serving the last known set
        redis.kill()
        time.sleep(0.5)  # let the watchers notice (they must not drop anything)
        for port in (port1, port2):
            assert httpx.get(f"http://127.0.0.1:{port}/whoami").status_code == 200
        assert len(members(admin1)) == 2
        metrics = httpx.get(f"http://127.0.0.1:{admin1}/metrics").text
        wait_until(
            lambda: (
                "lbproxy_registry_up 0.0" in httpx.get(f"http://127.0.0.1:{admin1}/metrics").text
            ),
            timeout=10,
        )
        assert "lbproxy_registry_last_sync_age_seconds" in metrics
    finally:
        for proc in regs:
            proc.stop()
        lb1.stop()
        lb2.stop()


def test_registration_outside_allowed_networks_is_ignored(
    redis: RedisServer, backends: list[Backend], tmp_path: Path
) -> None:
    text, port, admin = config(redis.url, allowed='["10.0.0.0/8"]')
    lb = Lbproxy(text, tmp_path).start(wait_ports=(port, admin))
    reg = register(redis, backends[0])
    try:
        wait_until(lambda: "outside" in lb.proc.output() or "allowed" in lb.proc.output())  # type: ignore[union-attr]
        assert members(admin) == {}
        assert httpx.get(f"http://127.0.0.1:{port}/whoami").status_code == 503
    finally:
        reg.stop()
        lb.stop()
