"""A tunnel between real sockets, forwarded by the engine a contract test is run on.

``kind`` is "<engine>-<loop>": engine ``native`` (the Link offloads both sockets to
``_splice``) or ``python`` (the Link's own protocols forward), on the stdlib asyncio
loop or uvloop. The test talks to the Link (go_away, abort, totals) exactly as the
pool, the drainer and the listener sweep do, and to the two application ends of the
tunnel (``client``, ``backend``) as plain non-blocking sockets.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import uvloop

from lbproxy.config.types import (
    Address,
    BackendConfig,
    ListenerConfig,
    PoolConfig,
    WebsocketConfig,
)
from lbproxy.core.pool import Pool
from lbproxy.core.tunnel_rules import Where
from lbproxy.ops.stats import Stats
from lbproxy.proxy.context import ListenerContext
from lbproxy.proxy.splice import Splicer, engine_class
from lbproxy.proxy.tunnel import Link
from lbproxy.proxy.wstunnel import WsLink, ws_sweep

KINDS = ["native-asyncio", "native-uvloop", "python-asyncio", "python-uvloop"]
HEAD = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of TCP sockets on 127.0.0.1 (resets are real, unlike socketpair)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class Holding(asyncio.Protocol):
    """What a proxy-side transport has before the Link takes it (reading is paused)."""


@dataclass
class Rig:
    kind: str
    loop: asyncio.AbstractEventLoop
    ctx: ListenerContext
    link: Link
    client: socket.socket  # the client application's end
    backend: socket.socket  # the backend application's end

    @property
    def native(self) -> bool:
        return self.kind.startswith("native")

    async def send(self, sock: socket.socket, data: bytes) -> None:
        await self.loop.sock_sendall(sock, data)

    async def read(self, sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
        """Exactly ``n`` bytes (fewer only if the peer closed first)."""
        got = bytearray()
        async with asyncio.timeout(timeout):
            while len(got) < n:
                chunk = await self.loop.sock_recv(sock, n - len(got))
                if not chunk:
                    break
                got += chunk
        return bytes(got)

    async def read_to_eof(self, sock: socket.socket, timeout: float = 5.0) -> bytes:
        """Everything until EOF (a reset counts as the end)."""
        got = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await self.loop.sock_recv(sock, 65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
        return bytes(got)

    def finished(self) -> bool:
        return self.link not in self.ctx.connections

    async def sweeping(self, tick: float = 0.05) -> None:
        """The listener's sweep, as far as pings go (run it as a task)."""
        while True:
            ws_sweep(self.ctx, time.monotonic())
            await asyncio.sleep(tick)

    async def until(self, cond: Callable[[], object], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.01)


async def make_rig(
    kind: str,
    ws: bool = True,
    to_client: bytes = b"",
    head_len: int = 0,
    websocket: WebsocketConfig | None = None,
) -> Rig:
    """Both proxy-side sockets become asyncio transports, then a (Ws)Link starts on them
    (``websocket``: the pool's [pools.NAME.websocket] table, ws_rules applies it)."""
    loop = asyncio.get_running_loop()
    backends = (BackendConfig("b", Address("127.0.0.1", 1)),)
    pool = Pool(PoolConfig("p", backends=backends, websocket=websocket or WebsocketConfig()))
    ctx = ListenerContext(ListenerConfig("l", Address("127.0.0.1", 0), "p"), pool, Stats(), loop)
    if kind.startswith("native"):
        engine_type = engine_class()
        assert engine_type is not None, "the native engine is not built"
        ctx.splicer = Splicer(engine_type, loop)
        ctx.splicer.set_policy(ctx.ws_policy)
    client_app, client_proxy = tcp_pair()
    backend_proxy, backend_app = tcp_pair()
    ct, _ = await loop.connect_accepted_socket(Holding, client_proxy)
    bt, _ = await loop.connect_accepted_socket(Holding, backend_proxy)
    ct.pause_reading()
    bt.pause_reading()
    cls = WsLink if ws else Link
    link = cls(ctx, pool.backends["b"], bt, ct, "127.0.0.1", time.monotonic())
    if isinstance(link, WsLink):
        link.start(to_client, b"", head_len=head_len)
    else:
        link.start(to_client, b"")
    expected = Where.NATIVE if kind.startswith("native") else Where.PYTHON
    assert link.where is expected  # the contract runs on the engine it names
    return Rig(kind, loop, ctx, link, client_app, backend_app)


def run(kind: str, scenario: Callable[[], Awaitable[None]], timeout: float = 15.0) -> None:
    """Run ``scenario`` on the loop ``kind`` names."""
    factory = uvloop.new_event_loop if kind.endswith("uvloop") else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), timeout))


def contract(kind: str, body: Callable[[Rig], Awaitable[None]], **rig_args: object) -> None:
    """Run ``body`` on a fresh tunnel of ``kind``; everything is closed afterwards."""

    async def scenario() -> None:
        rig = await make_rig(kind, **rig_args)  # type: ignore[arg-type]
        try:
            await body(rig)
        finally:
            rig.client.close()
            rig.backend.close()
            if rig.link.where is not Where.NATIVE_DONE:
                rig.link.abort("test over")
            await asyncio.sleep(0)
            if rig.ctx.splicer is not None:
                rig.ctx.splicer.close()

    run(kind, scenario)
