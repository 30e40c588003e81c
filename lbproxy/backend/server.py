"""Entry points of the reference backend: ``serve_backend`` (a coroutine) and ``run_backend``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from lbproxy.backend.interfaces import ChatService, ServedConnection
from lbproxy.backend.options import BackendOptions
from lbproxy.backend.protocol import CLOSE_GRACE, Connection
from lbproxy.backend.routes import ServerView
from lbproxy.config.types import Address
from lbproxy.errors import RegistryError

if TYPE_CHECKING:
    from lbproxy.backend.chat import ChatHub
    from lbproxy.registry.register import Registration

__all__ = ["BackendOptions", "run_backend", "serve_backend"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def load_page() -> bytes:
    return importlib.resources.files("lbproxy.backend").joinpath("static/index.html").read_bytes()


class BackendServer:
    """State shared by the connections of one backend process (an interfaces.ConnectionHost)."""

    def __init__(self, backend_id: str, page: bytes, chat: ChatService | None = None) -> None:
        self.backend_id = backend_id
        self.page = page
        self.chat = chat
        self.draining = False
        self.hurried = False  # a second stop signal: skip the rest of the drain
        self.connections: set[ServedConnection] = set()
        self.websockets: set[ServedConnection] = set()
        self.changed = asyncio.Event()  # set whenever a websocket or a connection goes away

    def view(self) -> ServerView:
        return ServerView(self.backend_id, len(self.websockets), self.draining, self.page)

    def protocol(self) -> Connection:
        return Connection(self)

    def hurry(self) -> None:
        self.hurried = True
        self.changed.set()

    async def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for websockets to leave, then close the rest with 1001."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.websockets and loop.time() < deadline and not self.hurried:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), deadline - loop.time())
        await self.close_all(1001, "going away")

    async def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.websockets):
            conn.close(code, reason)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_GRACE
        while self.websockets and loop.time() < deadline and not self.hurried:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), deadline - loop.time())
        for conn in list(self.connections):
            conn.abort()


def _bound_address(server: asyncio.Server) -> Address:
    name = server.sockets[0].getsockname()
    return Address(str(name[0]), int(name[1]))


class _Signals:
    """SIGTERM/SIGINT: the first starts the drain, a second one cuts it short."""

    def __init__(self, backend: BackendServer) -> None:
        self.backend = backend
        self.stop = asyncio.Event()
        self.installed: list[signal.Signals] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            try:
                loop.add_signal_handler(sig, self._received, sig)
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
                continue
            self.installed.append(sig)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self.installed:
            loop.remove_signal_handler(sig)
        self.installed.clear()

    def _received(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            log.info("%s again: closing now", sig.name)
            self.backend.hurry()
        else:
            log.info("%s: draining", sig.name)
            self.stop.set()


async def _register(options: BackendOptions, backend_id: str, bound: Address) -> Registration:
    from lbproxy.registry.register import Registration  # written in parallel; imported when needed

    assert options.redis_url is not None
    address = options.advertise or bound
    if address.host in ("0.0.0.0", "::"):
        log.warning("registering the wildcard address %s: pass --advertise HOST:PORT", address)
    registration = Registration(
        options.redis_url, options.prefix, options.pool, backend_id, str(address), ttl=options.ttl
    )
    await registration.start()
    return registration


async def serve_backend(
    options: BackendOptions, *, ready: Callable[[Address], None] | None = None
) -> None:
    """Serve until cancelled or until SIGTERM/SIGINT (then drain, deregister and return)."""
    loop = asyncio.get_running_loop()
    backend = BackendServer("", load_page())
    tcp = await loop.create_server(
        backend.protocol,
        options.listen.host,
        options.listen.port,
        backlog=4096,
        start_serving=False,
    )
    bound = _bound_address(tcp)
    backend.backend_id = options.id or f"backend-{bound.port}"
    signals = _Signals(backend)
    signals.install()
    registration: Registration | None = None
    hub: ChatHub | None = None
    try:
        if options.redis_url is not None:
            from lbproxy.backend.chat import ChatHub

            hub = ChatHub(options, backend.backend_id)
            await hub.start()
            backend.chat = hub
        await tcp.start_serving()
        if options.redis_url is not None:
            registration = await _register(options, backend.backend_id, bound)
        log.info("backend %s listening on %s", backend.backend_id, bound)
        if ready is not None:
            ready(bound)
        await signals.stop.wait()
        if registration is not None:
            with contextlib.suppress(RegistryError, OSError):
                await registration.set_draining()
        await backend.drain(options.drain_seconds)
    finally:
        signals.remove()
        tcp.close()
        backend.draining = True
        for conn in list(backend.connections):
            conn.abort()
        if registration is not None:
            with contextlib.suppress(RegistryError, OSError):
                await registration.stop()
        if hub is not None:
            await hub.stop()
        log.info("backend %s stopped", backend.backend_id)


def run_backend(options: BackendOptions) -> None:
    """Run :func:`serve_backend` on uvloop when it is importable, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(serve_backend(options))
        return
    uvloop.run(serve_backend(options))
