"""The hot path: two asyncio Protocols joined back to back.

After the handshake, each transport gets a lean protocol whose data_received writes
straight to the other transport. When a transport's write buffer passes its high-water
mark, asyncio calls pause_writing() on *its* protocol, which pauses reading on the peer
(resume_writing() resumes it), so a slow reader never makes lbproxy buffer without
bound. Half-close (EOF) is passed on with write_eof(). Per chunk: one write and one
integer add; the websocket variant (wstunnel.WsLink) also follows frames both ways.

The rules (side modes, the go-away rule, the 1001 frame) are tunnel_rules'; the same
Link stays in charge when the engine forwards the sockets (``where`` is NATIVE).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lbproxy.core.tunnel_rules import (
    AFTER,
    CLOSED,
    FORWARD,
    GOING_AWAY_FRAME,
    PYTHON,
    GoAway,
    Side,
    go_away,
)
from lbproxy.proxy.connect import HIGH_WATER
from lbproxy.proxy.native_tunnel import GRACE, NativeTunnel
from lbproxy.proxy.parting import Linger, Parting

if TYPE_CHECKING:
    from lbproxy.core.pool import Backend
    from lbproxy.proxy.context import ListenerContext

__all__ = ["GOING_AWAY_FRAME", "GRACE", "ClientHalf", "Linger", "Link", "Parting"]


class ClientHalf(Side, asyncio.Protocol):
    """Client side of a tunnel: bytes from the client go to the backend."""

    __slots__ = ("eof", "link", "nbytes", "out", "transport")

    def __init__(self, link: Link, transport: asyncio.Transport) -> None:
        self.link = link
        self.transport = transport
        self.out: asyncio.Transport = link.transport
        self.nbytes = 0
        self.eof = False
        self.mode = FORWARD  # (this side's Side state)

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.out.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        out = self.out
        if self.link.eof or not out.can_write_eof():  # (TLS cannot half-close: close)
            out.close()
            return False
        out.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.move(CLOSED)
        self.link.side_lost(self, "client closed" if exc is None else f"client error: {exc}")

    def pause_writing(self) -> None:
        self.out.pause_reading()

    def resume_writing(self) -> None:
        self.out.resume_reading()


class Link(NativeTunnel, asyncio.Protocol):
    """Backend side of a tunnel and owner of the proxied connection (what the pool tracks
    for draining and the listener for idle sweeps); a NativeTunnel once the engine has its
    sockets (``where`` NATIVE: the byte counts, go-away, abort and end are NativeTunnel's)."""

    __slots__ = ("client", "eof", "lost", "out", "transport")

    WS = False  # (WsLink: True) a websocket: what the go-away rule is told (``ws``)

    def __init__(
        self,
        ctx: ListenerContext,
        backend: Backend,
        transport: asyncio.Transport,
        client_transport: asyncio.Transport,
        client_addr: str,
        started: float,
    ) -> None:
        NativeTunnel.__init__(self, ctx, backend, client_addr, started, self.WS)
        self.transport = transport
        self.out: asyncio.Transport = client_transport
        self.eof = False
        self.lost = 0
        self.client = ClientHalf(self, client_transport)  # (self.mode: the backend side's)

    # -- wiring ------------------------------------------------------------
    def start(
        self, to_client: bytes, to_backend: bytes, offload: bool = True, key: bytes | None = None
    ) -> None:
        """Take over both transports; flush bytes that arrived during the handshake.

        With ``offload`` (and a native engine on the listener), the sockets then move to
        the engine when nothing is left buffered.
        """
        ctx = self.ctx
        self.out.set_write_buffer_limits(high=HIGH_WATER)  # (the backend side set its own)
        ctx.connections.add(self)
        ctx.pool.attach(self.backend, self, key)
        if to_client:
            self.nbytes += len(to_client)
            self.out.write(to_client)
        if to_backend:
            self.client.nbytes += len(to_backend)
            self.transport.write(to_backend)
        splicer = ctx.splicer
        if offload and splicer is not None and splicer.offload(self):
            return
        self.transport.set_protocol(self)
        self.out.set_protocol(self.client)
        self.transport.resume_reading()
        self.out.resume_reading()

    # -- backend -> client -------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.out.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        out = self.out
        if self.client.eof or not out.can_write_eof():  # (TLS cannot half-close: close)
            out.close()
            return False
        out.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.move(CLOSED)
        self.side_lost(self, "backend closed" if exc is None else f"backend error: {exc}")

    def pause_writing(self) -> None:
        self.out.pause_reading()

    def resume_writing(self) -> None:
        self.out.resume_reading()

    # -- lifecycle ---------------------------------------------------------
    def side_lost(self, side: asyncio.BaseProtocol, reason: str) -> None:
        self.lost += 1
        if not self.reason:
            self.reason = reason
        if self.lost == 1:  # the other side flushes what it has, then closes
            (self.transport if side is self.client else self.out).close()
        else:
            self.finish()

    def totals(self) -> tuple[int, int]:
        nin, nout = NativeTunnel.totals(self)
        return nin + self.client.nbytes, nout

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.ctx.loop

    def abort(self, reason: str) -> None:
        if self.where is not PYTHON:
            NativeTunnel.abort(self, reason)
            return
        self.reason = reason
        self.transport.close()
        self.out.close()

    def go_away(self) -> None:
        """Drain: plain TCP half-closes both sides (FIN) and lets the peers finish."""
        self.reason = self.reason or "drained"
        self._go_away()

    def _go_away(self) -> None:
        if self.where is not PYTHON:
            self._native_go_away()
        elif self.mode is FORWARD and self.client.mode is FORWARD:
            self._go_away_now()

    def _go_away_action(self) -> GoAway:
        return go_away(False, False, True)

    def _go_away_now(self) -> None:
        """Apply the go-away rule now (WAIT_BOUNDARY: WsLink decides again at the boundary)."""
        action = self._go_away_action()
        if action is GoAway.WAIT_BOUNDARY:
            self._wait_boundary()
            return
        if action is GoAway.CLOSE_FRAME:
            self._close_frames()
        client_mode, backend_mode = AFTER[action]
        Parting.take_over(self.out, self, self.client, client_mode, GRACE)
        Parting.take_over(self.transport, self, self, backend_mode, GRACE)

    def _wait_boundary(self) -> None:
        raise AssertionError("a plain tunnel has no frames to wait for")

    def _close_frames(self) -> None:
        """The close frames of a go-away (wstunnel.WsLink: per ws_rules.CloseKind)."""
        self.out.write(GOING_AWAY_FRAME)

    # -- the native engine holds the sockets (splice.py) ----------------------
    def native_started(self, slot: int) -> None:
        """The engine now forwards this tunnel's sockets: the transports (closed, or about
        to be) are let go, so a native tunnel holds no uvloop transport in Python."""
        NativeTunnel.native_started(self, slot)
        splicer = self.ctx.splicer
        if splicer is not None:
            client = self.client
            self.transport = self.out = client.transport = client.out = splicer.gone

    def finish(self) -> None:
        self.lost = 2  # (both sides are gone, whichever way it ended)
        NativeTunnel.finish(self)
