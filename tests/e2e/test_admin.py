"""The admin HTTP server (every route) and the admin CLI clients against it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from lbproxy.config.types import Address, AdminConfig, BackendConfig, PoolConfig
from lbproxy.core.pool import BackendState, Pool
from lbproxy.ops import admin_client
from lbproxy.ops.admin import AdminServer
from lbproxy.ops.metrics import build_registry
from lbproxy.ops.stats import Stats
from tests.support import free_port


@dataclass
class Admin:
    server: AdminServer
    address: Address
    pools: dict[str, Pool]
    stats: Stats

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def make_pools() -> dict[str, Pool]:
    chat = Pool(
        PoolConfig(
            name="chat",
            balance="round-robin",
            backends=(
                BackendConfig("b1", Address("127.0.0.1", 9001), weight=2),
                BackendConfig("b2", Address("127.0.0.1", 9002)),
            ),
        )
    )
    chat.upsert("r1", Address("::1", 9003), 1, source="redis")
    echo = Pool(PoolConfig(name="echo", backends=(BackendConfig("e1", Address("10.0.0.5", 80)),)))
    return {"chat": chat, "echo": echo}


async def start_admin(token: str = "") -> Admin:
    pools = make_pools()
    stats = Stats()
    registry = build_registry(lambda: pools, stats, lambda: {"public": 1})
    server = AdminServer(AdminConfig(Address("127.0.0.1", 0), token), lambda: pools, registry)
    address = await server.start()
    assert address.port != 0
    return Admin(server, address, pools, stats)


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    running = await start_admin()
    yield running
    await running.server.stop()


@pytest.fixture
async def secured() -> AsyncIterator[Admin]:
    running = await start_admin(token="s3cret")
    yield running
    await running.server.stop()


async def request(admin: Admin, method: str, path: str, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=admin.url, trust_env=False) as client:
        return await client.request(method, path, **kwargs)  # type: ignore[arg-type]


async def test_healthz(admin: Admin) -> None:
    response = await request(admin, "GET", "/healthz")
    assert response.status_code == 200
    assert response.text == "ok\n"
    head = await request(admin, "HEAD", "/healthz")
    assert head.status_code == 200
    assert head.content == b""


async def test_api_pools_document(admin: Admin) -> None:
    admin.pools["chat"].backends["b1"].active = 4
    admin.pools["chat"].mark_down("b2", "test")
    response = await request(admin, "GET", "/api/pools")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    pools = response.json()["pools"]
    assert set(pools) == {"chat", "echo"}
    assert pools["chat"]["balance"] == "round-robin"
    assert pools["echo"]["balance"] == "least-connections"
    assert pools["chat"]["backends"] == [
        {"id": "b1", "address": "127.0.0.1:9001", "state": "up", "active": 4, "weight": 2,
         "source": "static"},
        {"id": "b2", "address": "127.0.0.1:9002", "state": "down", "active": 0, "weight": 1,
         "source": "static"},
        {"id": "r1", "address": "[::1]:9003", "state": "up", "active": 0, "weight": 1,
         "source": "redis"},
    ]  # fmt: skip


async def test_metrics_route(admin: Admin) -> None:
    admin.pools["chat"].backends["b1"].active = 6
    admin.stats.connections_total["public"] += 11
    admin.stats.rejected[("public", "431")] += 1
    response = await request(admin, "GET", "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    assert 'lbproxy_connections_active{backend="b1",pool="chat"} 6.0' in text
    assert 'lbproxy_connections_total{listener="public"} 11.0' in text
    assert 'lbproxy_rejected_total{listener="public",reason="431"} 1.0' in text
    for name in (
        "lbproxy_backend_up",
        "lbproxy_bytes_total",
        "lbproxy_handshake_seconds_bucket",
        "lbproxy_upstream_errors_total",
    ):
        assert f"# TYPE {name.removesuffix('_bucket').removesuffix('_total')}" in text


async def test_drain_and_enable(admin: Admin) -> None:
    chat = admin.pools["chat"]
    response = await request(admin, "POST", "/api/pools/chat/backends/b1/drain")
    assert response.status_code == 202
    assert response.json() == {"pool": "chat", "backend": "b1", "state": "draining"}
    assert chat.backends["b1"].state is BackendState.DRAINING
    response = await request(admin, "POST", "/api/pools/chat/backends/b1/enable")
    assert response.status_code == 200
    assert response.json()["state"] == "up"
    assert chat.backends["b1"].state is BackendState.UP


async def test_not_found_and_wrong_method(admin: Admin) -> None:
    cases = [
        ("POST", "/api/pools/nope/backends/b1/drain", 404, "no pool 'nope'"),
        ("POST", "/api/pools/chat/backends/zz/enable", 404, "no backend 'zz' in pool 'chat'"),
        ("GET", "/nothing/here", 404, "no such resource: /nothing/here"),
        ("GET", "/api/pools/chat/backends/b1/drain", 405, "method GET not allowed"),
        ("POST", "/api/pools", 405, "method POST not allowed"),
        ("DELETE", "/healthz", 405, "method DELETE not allowed"),
    ]
    for method, path, status, message in cases:
        response = await request(admin, method, path)
        assert response.status_code == status, (method, path)
        assert response.json() == {"error": message}
    response = await request(admin, "GET", "/api/pools/chat/backends/b1/drain")
    assert response.headers["allow"] == "POST"
    assert admin.pools["chat"].backends["b1"].state is BackendState.UP


async def test_token_required_for_posts(secured: Admin) -> None:
    path = "/api/pools/chat/backends/b2/drain"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = await request(secured, "POST", path, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
    # no token: unknown pools are not revealed either
    assert (await request(secured, "POST", "/api/pools/x/backends/y/drain")).status_code == 401
    assert secured.pools["chat"].backends["b2"].state is BackendState.UP
    good = {"Authorization": "Bearer s3cret"}
    assert (await request(secured, "POST", path, headers=good)).status_code == 202
    assert secured.pools["chat"].backends["b2"].state is BackendState.DRAINING
    assert (await request(secured, "GET", "/api/pools")).status_code == 200  # GETs are open


async def test_cross_origin_posts_are_refused(admin: Admin) -> None:
    path = "/api/pools/chat/backends/b1/drain"
    evil = {"Origin": "http://evil.example"}
    response = await request(admin, "POST", path, headers=evil)
    assert response.status_code == 403
    assert admin.pools["chat"].backends["b1"].state is BackendState.UP
    same = {"Origin": admin.url}
    assert (await request(admin, "POST", path, headers=same)).status_code == 202


async def test_dashboard_page_is_self_contained(admin: Admin) -> None:
    response = await request(admin, "GET", "/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert 'id="pools"' in page
    assert "/api/pools" in page and "/metrics" in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page


async def raw_exchange(admin: Admin, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(admin.address.host, admin.address.port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout=5)  # until the server closes
    finally:
        writer.close()


async def test_keep_alive_and_request_bodies(admin: Admin) -> None:
    reader, writer = await asyncio.open_connection(admin.address.host, admin.address.port)
    try:
        writer.write(
            b"POST /api/pools/chat/backends/b1/drain HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: 11\r\n\r\nhello world"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 202 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")  # same connection
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(3) == b"ok\n"
    finally:
        writer.close()
    assert admin.pools["chat"].backends["b1"].state is BackendState.DRAINING
    closed = await raw_exchange(
        admin, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert closed.startswith(b"HTTP/1.1 200 ") and closed.endswith(b"ok\n")


async def test_bad_requests(admin: Admin) -> None:
    assert (await raw_exchange(admin, b"this is not http\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    huge = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20000  # head never ends
    assert (await raw_exchange(admin, huge)).startswith(b"HTTP/1.1 431 ")
    # the server still serves others
    assert (await request(admin, "GET", "/healthz")).status_code == 200


async def test_stop_closes_open_connections() -> None:
    running = await start_admin()
    reader, writer = await asyncio.open_connection(running.address.host, running.address.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"ok\n"), 5)
    await asyncio.wait_for(running.server.stop(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(running.address.host, running.address.port)


# -- admin_client ----------------------------------------------------------------
async def test_client_status_table_and_json(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    admin.pools["chat"].backends["b2"].active = 12
    admin.pools["echo"].drain("e1")
    assert await asyncio.to_thread(admin_client.status, admin.url, False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["POOL", "BACKEND", "ADDRESS", "STATE", "ACTIVE", "WEIGHT"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        ["chat", "b1", "127.0.0.1:9001", "up", "0", "2"],
        ["chat", "b2", "127.0.0.1:9002", "up", "12", "1"],
        ["chat", "r1", "[::1]:9003", "up", "0", "1"],
        ["echo", "e1", "10.0.0.5:80", "draining", "0", "1"],
    ]
    address_column = lines[0].index("ADDRESS")  # columns are aligned
    assert all(
        line.index(row[2]) == address_column for line, row in zip(lines[1:], rows, strict=True)
    )

    assert await asyncio.to_thread(admin_client.status, admin.url + "/", True) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["pools"]["chat"]["backends"][1]["active"] == 12


async def test_client_drain_enable_and_errors(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    chat = admin.pools["chat"]
    assert await asyncio.to_thread(admin_client.drain, admin.url, "chat", "b2") == 0
    assert chat.backends["b2"].state is BackendState.DRAINING
    assert capsys.readouterr().out.strip() == "draining backend b2 in pool chat"
    assert await asyncio.to_thread(admin_client.enable, admin.url, "chat", "b2") == 0
    assert chat.backends["b2"].state is BackendState.UP
    assert capsys.readouterr().out.strip() == "enabled backend b2 in pool chat"

    # address without a scheme works too; unknown backend -> exit 1 and one clear line
    host = str(admin.address)
    assert await asyncio.to_thread(admin_client.drain, host, "chat", "nope") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "lbproxy: no backend nope in pool chat"
    assert await asyncio.to_thread(admin_client.enable, admin.url, "nopool", "b1") == 1
    assert capsys.readouterr().err.strip() == "lbproxy: no backend b1 in pool nopool"


async def test_client_token(
    secured: Admin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LBPROXY_ADMIN_TOKEN", raising=False)
    assert await asyncio.to_thread(admin_client.drain, secured.url, "chat", "b1") == 1
    err = capsys.readouterr().err.strip()
    assert err == "lbproxy: unauthorized: set --token or LBPROXY_ADMIN_TOKEN"
    assert secured.pools["chat"].backends["b1"].state is BackendState.UP
    assert await asyncio.to_thread(admin_client.drain, secured.url, "chat", "b1", "s3cret") == 0
    assert secured.pools["chat"].backends["b1"].state is BackendState.DRAINING
    monkeypatch.setenv("LBPROXY_ADMIN_TOKEN", "s3cret")
    assert await asyncio.to_thread(admin_client.enable, secured.url, "chat", "b1") == 0
    assert secured.pools["chat"].backends["b1"].state is BackendState.UP


def test_client_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for call in (
        lambda: admin_client.status(url, False),
        lambda: admin_client.drain(url, "chat", "b1"),
        lambda: admin_client.enable(url, "chat", "b1"),
    ):
        assert call() == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith(f"lbproxy: cannot reach admin API at {url}: ")
        assert "refused" in lines[0]
