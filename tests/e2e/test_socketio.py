"""The README recipes, exercised: Socket.IO across three nodes, plain websockets, SSE.

Three real python-socketio nodes on uvicorn share state through ``AsyncRedisManager`` on a
real redis-server (started once for the module). The python-socketio client starts with
HTTP long-polling (the default transports) and upgrades to a websocket; it connects by
host name (``localhost``), because aiohttp's cookie jar ignores cookies from IP hosts.
lbproxy runs at the default ``hash_balance_factor`` (README "Balancing and affinity").
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import socketio
from websockets.asyncio.client import connect as ws_connect

from tests.support import (
    Lbproxy,
    Proc,
    RedisServer,
    await_until,
    free_port,
    port_open,
    proxy_config,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
PING = 2.0  # engine.io ping interval and timeout on the nodes


@dataclass
class Node:
    id: str
    port: int
    redis_url: str
    proc: Proc | None = None

    def spawn(self) -> Node:
        args = [sys.executable, "-m", "tests.support.sio_node", "--port", str(self.port)]
        args += ["--id", self.id, "--redis", self.redis_url, "--ping", str(PING)]
        self.proc = Proc(args, cwd=str(REPO))
        return self

    def wait(self) -> None:
        wait_until(lambda: port_open(self.port), timeout=20)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stop()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[Node]]:
    redis = RedisServer().start()
    started: list[Node] = []
    try:
        for i in range(1, 4):  # (spawned together: each takes ~1 s to import)
            started.append(Node(f"n{i}", free_port(), redis.url).spawn())
        for node in started:
            node.wait()
        yield started
    finally:
        for node in started:
            node.stop()
        redis.stop()


@dataclass
class Proxy:
    port: int
    admin_port: int
    proc: Lbproxy

    def metric_lines(self, name: str) -> list[str]:
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5).text
        return [line for line in text.splitlines() if line.startswith(name + "{")]

    def server_errors(self) -> list[str]:
        """Requests lbproxy answered 5xx itself (502, 503, 504)."""
        return [
            line
            for line in self.metric_lines("lbproxy_rejected_total")
            if 'reason="5' in line and not line.endswith(" 0.0")
        ]


def start_proxy(nodes: list[Node], tmp_path: Path, pool: dict[str, object]) -> Proxy:
    text, port, admin_port = proxy_config(
        [(n.id, f"127.0.0.1:{n.port}") for n in nodes], pool={"balance": "hash", **pool}
    )
    proc = Lbproxy(text, tmp_path).start(wait_ports=(port, admin_port))
    return Proxy(port, admin_port, proc)


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    await asyncio.gather(*(c.sio.disconnect() for c in made), return_exceptions=True)
    await asyncio.gather(*(c.sio.shutdown() for c in made), return_exceptions=True)
    for c in made:  # (a client whose connect failed half-way keeps its aiohttp session)
        http = c.sio.eio.http
        if http is not None and not http.closed:
            await http.close()


@dataclass
class Client:
    sio: socketio.AsyncClient
    news: list[object] = field(default_factory=list)
    errors: list[object] = field(default_factory=list)
    hellos: list[str] = field(default_factory=list)

    @classmethod
    def make(cls) -> Client:
        sio = socketio.AsyncClient(
            reconnection=True,
            reconnection_delay=0.05,
            reconnection_delay_max=0.2,
            randomization_factor=0.2,
            request_timeout=5,
        )
        client = cls(sio)
        sio.on("news", client.news.append)
        sio.on("connect_error", client.errors.append)
        sio.on("hello", lambda data: client.hellos.append(data["node"]))
        return client

    async def connect(self, port: int) -> float:
        started = time.monotonic()
        await self.sio.connect(f"http://localhost:{port}", wait_timeout=10)
        await await_until(lambda: self.sio.transport() == "websocket", timeout=10)
        return time.monotonic() - started

    async def node(self) -> str:
        return str(await self.sio.call("whoami", timeout=5))


async def connect_all(clients: list[Client], port: int, count: int) -> list[float]:
    fresh = [Client.make() for _ in range(count)]
    clients.extend(fresh)
    return list(await asyncio.gather(*(c.connect(port) for c in fresh)))


@pytest.mark.parametrize("hash_key", ["cookie:lbid", "ip"])
async def test_socketio_across_nodes_survives_a_node_kill(
    nodes: list[Node], tmp_path: Path, clients: list[Client], hash_key: str
) -> None:
    proxy = start_proxy(nodes, tmp_path, {"hash_key": hash_key, "sticky_cookie": True})
    killed: Node | None = None
    try:
        (one,) = await connect_all(clients, proxy.port, 1)
        times = await connect_all(clients, proxy.port, 30)
        where = {id(c): await c.node() for c in clients}
        for c in clients:  # each session stayed on the node of its handshake
            assert c.hellos == [where[id(c)]]
        spread = set(where.values())
        if hash_key == "ip":
            assert len(spread) == 1  # one client IP: one key, stuck where it is open
        else:
            assert len(spread) >= 2, where  # so the broadcast has to cross nodes
        await clients[0].sio.emit("broadcast", "hi all")
        await await_until(lambda: all(c.news for c in clients), timeout=10)

        counts = {n.id: list(where.values()).count(n.id) for n in nodes}
        killed = next(n for n in nodes if n.id == max(counts, key=lambda k: counts[k]))
        victims = [c for c in clients if where[id(c)] == killed.id]
        kill_at = time.monotonic()
        killed.kill()

        gone = killed.id

        def moved(c: Client) -> bool:
            return c.sio.connected and c.sio.transport() == "websocket" and c.hellos[-1] != gone

        await await_until(lambda: all(moved(c) for c in victims), timeout=20)
        reconnect = time.monotonic() - kill_at
        for c in victims:
            assert await c.node() != killed.id
        for c in clients:
            c.news.clear()
        await victims[0].sio.emit("broadcast", "after the kill")
        await await_until(lambda: all(c.news for c in clients), timeout=10)
        assert [c.errors for c in clients if c.errors] == []
        assert proxy.server_errors() == []
        print(
            f"\n{hash_key}: 1 client {one * 1000:.0f} ms; 30 clients max {max(times) * 1000:.0f} "
            f"ms, mean {sum(times) / len(times) * 1000:.0f} ms; {len(victims)} clients of "
            f"{killed.id} back on websocket {reconnect * 1000:.0f} ms after its SIGKILL"
        )
    finally:
        for c in clients:
            await c.sio.disconnect()
        proxy.proc.stop()
        if killed is not None:
            killed.spawn().wait()


async def test_plain_websocket_recipe(nodes: list[Node], tmp_path: Path) -> None:
    """Any balance works for plain websockets: one connection carries the whole session."""
    proxy = start_proxy(nodes, tmp_path, {"balance": "least-connections"})
    try:
        sockets = [await ws_connect(f"ws://127.0.0.1:{proxy.port}/ws") for _ in range(6)]
        greetings = [await ws.recv() for ws in sockets]
        assert {str(g) for g in greetings} == {"node n1", "node n2", "node n3"}
        for i, ws in enumerate(sockets):
            await ws.send(f"message {i}")
            assert await ws.recv() == f"message {i}"
        for ws in sockets:
            await ws.close()
    finally:
        proxy.proc.stop()


async def test_sse_recipe_streams_each_event_as_it_is_sent(
    nodes: list[Node], tmp_path: Path
) -> None:
    """Server-Sent Events: a long response lbproxy forwards chunk by chunk, no buffering."""
    proxy = start_proxy(nodes, tmp_path, {"hash_key": "ip"})
    counted = asyncio.create_task(first_bytes_counted(proxy))
    try:
        arrivals: list[float] = []
        lines: list[str] = []
        async with httpx.AsyncClient(timeout=10) as client:
            started = time.monotonic()
            url = f"http://127.0.0.1:{proxy.port}/sse?n=30"
            async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as r:
                assert r.status_code == 200
                assert r.headers["content-type"] == "text/event-stream"
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        arrivals.append(time.monotonic() - started)
        ended = time.monotonic()
        node = lines[0].split()[0]
        assert lines == [f"{node} {i}" for i in range(30)]
        # the node sends one event every 50 ms: the first arrives long before the last
        assert arrivals[0] < arrivals[-1] - 1.0, arrivals
        # and the stream's bytes reached the stats (the dashboard) while it was still open
        assert await asyncio.wait_for(counted, 5) < ended
    finally:
        counted.cancel()
        proxy.proc.stop()


async def first_bytes_counted(proxy: Proxy) -> float:
    """When lbproxy's metrics first show bytes sent to the client."""
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            text = (await client.get(f"http://127.0.0.1:{proxy.admin_port}/metrics")).text
            for line in text.splitlines():
                out = line.startswith("lbproxy_bytes_total{") and 'direction="out"' in line
                if out and float(line.rsplit(" ", 1)[1]) > 0:
                    return time.monotonic()
            await asyncio.sleep(0.05)
