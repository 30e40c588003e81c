"""Redis outages, silent subscription death, passwords/ACLs, unix sockets and TLS."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lbproxy.config.types import Address, BackendConfig
from lbproxy.core.pool import BackendState
from lbproxy.registry.register import Registration
from tests.support import RedisServer, await_until, free_port
from tests.support.registry import (
    PREFIX,
    BlackholeProxy,
    custom_redis,
    make_pool,
    raw_client,
    raw_register,
    redis_ids,
    state_of,
    watching,
)

FAST = {"backoff_base": 0.05, "backoff_max": 0.4, "ping_interval": 0.3, "ping_timeout": 0.3}


async def hold(condition: Callable[[], bool], seconds: float) -> None:
    """Assert ``condition()`` stays true for ``seconds`` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), "condition stopped holding"
        await asyncio.sleep(0.05)


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_outage_keeps_backends_then_recovers(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lbproxy.registry.register")
    pool = make_pool()
    reg = Registration(redis.url, PREFIX, "chat", "r1", "127.0.0.1:8001", ttl=1.5)
    restarted: RedisServer | None = None
    try:
        async with watching(redis.url, {"chat": pool}, resync_interval=60, **FAST) as watcher:
            await reg.start()
            await await_until(lambda: "r1" in redis_ids(pool), timeout=5)
            assert watcher.connected
            redis.kill()
            await await_until(lambda: not watcher.connected, timeout=3)
            # Well past r1's TTL and many reconnect attempts: still served, still up.
            await hold(lambda: state_of(pool, "r1") is BackendState.UP, 2.5)
            assert len(messages(caplog, "unreachable")) == 1  # once per outage
            assert len(messages(caplog, "heartbeat for r1 failed")) == 1

            restarted = RedisServer(port=redis.port).start()
            t0 = time.monotonic()
            await await_until(lambda: watcher.connected, timeout=5)
            print(f"reconnected {time.monotonic() - t0:.2f}s after Redis came back")
            # r1's heartbeat recreates its lost entry (announced as a join).
            await await_until(lambda: state_of(pool, "r1") is BackendState.UP, timeout=3)
            await await_until(lambda: messages(caplog, "heartbeat for r1 succeeded"), timeout=3)
            async with raw_client(restarted.url) as client:
                await raw_register(client, "chat", "r2", "127.0.0.1:8002")
            await await_until(lambda: "r2" in redis_ids(pool), timeout=2)
            assert len(messages(caplog, "reconnected to Redis")) == 1
            assert len(messages(caplog, "heartbeat for r1 succeeded again")) == 1
    finally:
        await reg.stop()
        if restarted is not None:
            restarted.stop()


async def test_watcher_started_while_redis_is_down() -> None:
    port = free_port()
    pool = make_pool(static=(BackendConfig("s1", Address("127.0.0.1", 1)),))
    url = f"redis://127.0.0.1:{port}/0"
    server: RedisServer | None = None
    try:
        async with watching(url, {"chat": pool}, **FAST) as watcher:
            await hold(lambda: not watcher.connected and watcher.last_sync == 0.0, 0.5)
            assert set(pool.backends) == {"s1"}  # static backends served meanwhile
            server = RedisServer(port=port).start()
            await await_until(lambda: watcher.connected, timeout=5)
            async with raw_client(url) as client:
                await raw_register(client, "chat", "late", "127.0.0.1:8100")
            await await_until(lambda: "late" in redis_ids(pool), timeout=2)
            assert "s1" in pool.backends
    finally:
        if server is not None:
            server.stop()


async def test_silent_subscription_death_is_detected(redis: RedisServer) -> None:
    proxy = await BlackholeProxy(redis.port).start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    pool = make_pool()
    try:
        async with watching(
            url, {"chat": pool}, command_timeout=0.5, resync_interval=60, **FAST
        ) as watcher:
            await await_until(lambda: watcher.connected, timeout=5)
            async with raw_client(redis.url) as client:
                await raw_register(client, "chat", "p1", "127.0.0.1:8200")
                await await_until(lambda: "p1" in redis_ids(pool), timeout=2)
                proxy.frozen = True  # TCP stays open, nothing gets through
                t0 = time.monotonic()
                await await_until(lambda: not watcher.connected, timeout=3)
                print(f"silent subscription death detected in {time.monotonic() - t0:.2f}s")
                assert "p1" in redis_ids(pool)
                await raw_register(client, "chat", "p2", "127.0.0.1:8201")  # event lost
                proxy.frozen = False
                await await_until(lambda: watcher.connected, timeout=5)
                await await_until(lambda: redis_ids(pool) == {"p1", "p2"}, timeout=2)
    finally:
        await proxy.stop()


ACL_DOC = Path(__file__).resolve().parents[2] / "docs" / "registry.md"


def acl_commands(passwords: dict[str, str]) -> list[list[str]]:
    """The ACL SETUSER lines of docs/registry.md, for this test's prefix and passwords."""
    lines = [ln for ln in ACL_DOC.read_text().splitlines() if ln.startswith("ACL SETUSER")]
    assert len(lines) == 2
    out = []
    for line in lines:
        line = line.replace("lbproxy:", f"{PREFIX}:")
        for placeholder, password in passwords.items():
            line = line.replace(placeholder, password)
        out.append(line.split())
    return out


async def test_acl_users_unix_socket_and_no_secret_in_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {"ADMIN_PW": "adm1n-s3cret", "BACKEND_PASSWORD": "b4ck-s3cret"}
    secrets["LBPROXY_PASSWORD"] = "lbpr0xy-s3cret"
    with custom_redis("--requirepass", secrets["ADMIN_PW"]) as server:
        admin = f"redis://:{secrets['ADMIN_PW']}@127.0.0.1:{server.port}/0"
        async with raw_client(admin) as client:
            for command in acl_commands(secrets):
                await client.execute_command(*command)  # type: ignore[no-untyped-call]
        backend_url = f"redis://backend:{secrets['BACKEND_PASSWORD']}@127.0.0.1:{server.port}/0"
        watch_url = f"unix://lbproxy@{server.socket}?db=0&password={secrets['LBPROXY_PASSWORD']}"
        pool = make_pool()
        reg = Registration(backend_url, PREFIX, "chat", "a1", "127.0.0.1:8300")
        async with watching(watch_url, {"chat": pool}, **FAST) as watcher:
            await await_until(lambda: watcher.connected, timeout=5)
            await reg.start()
            await await_until(lambda: "a1" in redis_ids(pool), timeout=2)
            await reg.set_draining()
            await await_until(lambda: state_of(pool, "a1") is BackendState.DRAINING, timeout=2)
            await reg.stop()
            await await_until(lambda: "a1" not in pool.backends, timeout=2)
        wrong = f"redis://lbproxy:{secrets['LBPROXY_PASSWORD']}-wrong@127.0.0.1:{server.port}/0"
        async with watching(wrong, {"chat": pool}, **FAST) as watcher:
            await await_until(lambda: any("unreachable" in m for m in messages(caplog, "")), 5)
            assert not watcher.connected
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "***" in logged
    for secret in secrets.values():
        assert secret not in logged


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_tls(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls_args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    tls_args += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    with custom_redis(*tls_args, tls=True) as server:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={cert}"
        pool = make_pool()
        reg = Registration(url, PREFIX, "chat", "tls1", "127.0.0.1:8400")
        async with watching(url, {"chat": pool}, **FAST) as watcher:
            await await_until(lambda: watcher.connected, timeout=5)
            await reg.start()
            await await_until(lambda: "tls1" in redis_ids(pool), timeout=2)
            await reg.stop()
            await await_until(lambda: "tls1" not in pool.backends, timeout=2)
