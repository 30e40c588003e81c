"""Hand established tunnels to the native engine (``lbproxy._splice``).

A tunnel starts as two asyncio transports (tunnel.Link / wstunnel.WsLink). Once the
handshake is over and nothing is buffered, ``Splicer.offload`` duplicates both
sockets into the engine's epoll set and closes the transports; from then on the
engine forwards bytes in C (see _splice.c) and the Link object stays what the
pool, the listener sweep and the drainer talk to: with ``where`` NATIVE it is a
native_tunnel.NativeTunnel (its transports let go), which turns their calls (byte
counts, go_away, abort) into engine calls, and the engine reports the end of the
tunnel once (``NativeTunnel.native_finished``, called by the engine directly). The
engine is given the tunnel rules and the 1001 frame once, when it is made
(tunnel_rules.engine_setup), and the websocket policy of the listener's pool
(ws_rules.engine_ws_setup: limits, pings, their frames) with ``set_policy``; the
listener's sweep calls ``sweep`` for the pings. TLS listeners keep the Python tunnel
(the bytes must pass through the SSL object).
``LBPROXY_SPLICE=0`` turns the engine off.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from lbproxy.core.tunnel_rules import FORWARD, PYTHON, engine_setup
from lbproxy.core.ws_rules import WsPolicy, engine_ws_setup
from lbproxy.proxy import native_upgrade
from lbproxy.proxy.native_tunnel import NativeTunnel
from lbproxy.proxy.tunnel import Link
from lbproxy.proxy.wstunnel import WsLink

if TYPE_CHECKING:
    from collections.abc import Callable

    from lbproxy._splice import Engine


class Gone(asyncio.Transport):
    """Stands for a socket the engine holds: a transport that is already closed."""

    def is_closing(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class Detached(asyncio.Protocol):
    """What a transport whose socket moved to the engine is left with: nothing to do."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:  # pragma: no cover - reading is paused
        pass

    def eof_received(self) -> bool:
        return False


def engine_class() -> type[Engine] | None:
    """The native engine type, or None when it is off or was not built."""
    if os.environ.get("LBPROXY_SPLICE", "1") == "0":
        return None
    try:
        from lbproxy._splice import Engine
    except ImportError:  # built without a C compiler: the Python tunnel does everything
        return None
    return Engine


def native_available() -> bool:
    return engine_class() is not None


def make_engine(
    engine_type: type[Engine],
    on_finish: Callable[..., None],
    on_data: Callable[[Any, bytes | None, int], None] | None = None,
) -> Engine:
    """An engine that follows the tunnel rules (given to it here, once)."""
    rules, frame = engine_setup()
    return engine_type(on_finish, on_data, rules=rules, close_frame=frame)


class Splicer:
    """One listener's engine: its epoll fd watched by the event loop, its tunnels."""

    __slots__ = ("detached", "engine", "fd", "gone", "loop")

    def __init__(self, engine_type: type[Engine], loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # (the engine calls the two report methods itself: no Python hop in between)
        self.engine = make_engine(
            engine_type, NativeTunnel.native_finished, native_upgrade.NativeUpgrade.on_data
        )
        self.fd = self.engine.fileno()
        self.detached = Detached()
        self.gone = Gone()
        loop.add_reader(self.fd, self.engine.pump)

    @classmethod
    def create(cls, loop: asyncio.AbstractEventLoop) -> Splicer | None:
        engine_type = engine_class()
        return None if engine_type is None else cls(engine_type, loop)

    def __len__(self) -> int:
        return len(self.engine)

    def close(self) -> None:
        """Stop watching the engine (its remaining sockets close with it)."""
        self.loop.remove_reader(self.fd)

    def set_policy(self, policy: WsPolicy) -> None:
        """The websocket rules of the tunnels started from now on (ws_rules)."""
        params, opcodes, frames, ping = engine_ws_setup(policy, os.urandom(4))
        self.engine.ws_policy(params, opcodes, frames, ping)

    def sweep(self, now: float) -> None:
        """Pings (one sweep per engine); the tunnels the engine closed itself (dead peers,
        refused frames) get their GRACE."""
        for link, kind in self.engine.sweep(int(now * 1e9)):
            link.native_closed(kind)

    def offload(self, link: Link) -> bool:
        """Move ``link``'s two sockets into the engine; False when it has to stay in Python."""
        backend, client = link.transport, link.out
        if (
            link.where is not PYTHON
            or link.mode is not FORWARD
            or link.client.mode is not FORWARD
            or link.eof
            or link.client.eof
            or link.lost
            or backend.is_closing()
            or client.is_closing()
            or backend.get_write_buffer_size()
            or client.get_write_buffer_size()
        ):
            return False
        bsock = backend.get_extra_info("socket")
        csock = client.get_extra_info("socket")
        if bsock is None or csock is None:
            return False
        ws = False
        partial, skip, saw_close = b"", 0, False
        if isinstance(link, WsLink):
            if not link.client.scan.clean:  # (mid-frame: the Python scanner carries on)
                return False
            ws = True
            partial, skip, saw_close = link.partial, link.skip, link.saw_close
        try:
            cfd = os.dup(csock.fileno())
        except OSError:  # (out of fds: this tunnel stays in Python)
            return False
        try:
            bfd = os.dup(bsock.fileno())
        except OSError:
            os.close(cfd)
            return False
        try:
            slot = self.engine.add(link, cfd, bfd, ws, partial, skip, saw_close)
        except (MemoryError, ValueError, OSError):
            os.close(cfd)
            os.close(bfd)
            return False
        # the transports close their own fds now; the duplicates keep the connections open
        backend.set_protocol(self.detached)
        client.set_protocol(self.detached)
        backend.abort()
        client.abort()
        link.native_started(slot)
        return True
