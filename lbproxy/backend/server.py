"""Entry points of the reference backend: ``serve_backend`` (a coroutine) and ``run_backend``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from lbproxy.backend.options import BackendOptions
from lbproxy.backend.protocol import BackendServer, load_page
from lbproxy.config_types import Address
from lbproxy.errors import RegistryError

if TYPE_CHECKING:
    from lbproxy.backend.chat import ChatHub
    from lbproxy.registry import Registration

__all__ = ["BackendOptions", "run_backend", "serve_backend"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
    from lbproxy.registry import Registration  # written in parallel; imported when needed

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
