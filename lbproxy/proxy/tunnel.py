"""The hot path: two asyncio Protocols joined back to back.

After the handshake, each transport gets a lean protocol whose data_received writes
straight to the other transport. When a transport's write buffer passes its high-water
mark, asyncio calls pause_writing() on *its* protocol, which pauses reading on the peer
(resume_writing() resumes it), so a slow reader never makes lbproxy buffer without
bound. Half-close (EOF) is passed on with write_eof(). Per chunk: one write and one
integer add; the websocket variant also follows frame boundaries (wsframe) so a 1001
close can be injected cleanly when the backend drains.

The rules (side modes, the go-away rule, the 1001 frame) are tunnel_rules'; the same
Link stays in charge when the engine forwards the sockets (``where`` is NATIVE).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from lbproxy.proxy.accesslog import log_connection
from lbproxy.proxy.connect import HIGH_WATER
from lbproxy.proxy.parting import Linger, Parting
from lbproxy.proxy.tunnel_rules import (
    AFTER,
    GOING_AWAY_FRAME,
    WHERE_TRANSITIONS,
    GoAway,
    Mode,
    Side,
    Where,
    check,
    go_away,
)

if TYPE_CHECKING:
    from lbproxy.pool import Backend
    from lbproxy.proxy.context import ListenerContext

GRACE = 5.0  # seconds a going-away peer gets to close its side before we close it
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
        self.mode = Mode.FORWARD  # (this side's Side state)

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
        self.move(Mode.CLOSED)
        self.link.side_lost(self, "client closed" if exc is None else f"client error: {exc}")

    def pause_writing(self) -> None:
        self.out.pause_reading()

    def resume_writing(self) -> None:
        self.out.resume_reading()


class Link(Side, asyncio.Protocol):
    """Backend side of a tunnel and owner of the proxied connection (what the pool tracks
    for draining and the listener for idle sweeps)."""

    __slots__ = (
        "backend",
        "client",
        "client_addr",
        "ctx",
        "eof",
        "flushed_in",
        "flushed_out",
        "lost",
        "nbytes",
        "out",
        "reason",
        "slot",
        "started",
        "transport",
        "where",
    )

    ws = False  # (WsLink: True) what the go-away rule is told

    def __init__(
        self,
        ctx: ListenerContext,
        backend: Backend,
        transport: asyncio.Transport,
        client_transport: asyncio.Transport,
        client_addr: str,
        started: float,
    ) -> None:
        self.ctx = ctx
        self.backend = backend
        self.transport = transport
        self.out: asyncio.Transport = client_transport
        self.client_addr = client_addr
        self.started = started
        self.nbytes = 0
        self.eof = False
        self.lost = 0
        self.flushed_in = 0
        self.flushed_out = 0
        self.reason = ""
        self.slot = -1  # the native engine's slot once offloaded
        self.where = Where.PYTHON
        self.mode = Mode.FORWARD  # the backend side's Side state (the client's: self.client)
        self.client = ClientHalf(self, client_transport)

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
        self.move(Mode.CLOSED)
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

    def finish(self) -> None:
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.pool.detach(self.backend, self)
        self.flush_bytes()
        if ctx.access_log:
            log_connection(
                ctx,
                self.client_addr,
                self.backend,
                time.monotonic() - self.started,
                self.client.nbytes,
                self.nbytes,
                self.reason,
                messages=self.message_counts(),
            )

    def totals(self) -> tuple[int, int]:
        """Bytes (client -> backend, backend -> client) so far."""
        splicer = self.ctx.splicer
        if self.where is not Where.NATIVE or splicer is None:
            return self.client.nbytes, self.nbytes
        nin, nout = splicer.engine.counts(self.slot, self)
        return self.client.nbytes + nin, self.nbytes + nout

    def flush_bytes(self) -> None:
        """Move byte counts into the shared counters (at close and from the periodic sweep)."""
        stats = self.ctx.stats
        pool, backend = self.ctx.pool.name, self.backend.id
        total_in, total_out = self.totals()
        delta_in = total_in - self.flushed_in
        delta_out = total_out - self.flushed_out
        if delta_in:
            stats.bytes[(pool, backend, "in")] += delta_in
            self.flushed_in = total_in
        if delta_out:
            stats.bytes[(pool, backend, "out")] += delta_out
            self.flushed_out = total_out

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.ctx.loop

    def activity(self) -> int:
        total_in, total_out = self.totals()
        return total_in + total_out

    def abort(self, reason: str) -> None:
        if self.where is Where.PYTHON:
            self.reason = reason
            self.transport.close()
            self.out.close()
            return
        splicer = self.ctx.splicer
        if self.where is Where.NATIVE_DONE or splicer is None:
            return
        self.reason = reason
        nin, nout = splicer.engine.close(self.slot, self)
        self.native_finished(reason, nin, nout)

    def finish_request(self) -> None:
        pass  # (a tunnel: the drain decides)

    def go_away(self) -> None:
        """Drain: plain TCP half-closes both sides (FIN) and lets the peers finish."""
        self.reason = self.reason or "drained"
        self._go_away()

    def _go_away(self) -> None:
        if self.where is not Where.PYTHON:
            self._native_go_away()
        elif self.mode is Mode.FORWARD and self.client.mode is Mode.FORWARD:
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

    def message_counts(self) -> tuple[int, int] | None:
        """Websocket data messages (client -> backend, backend -> client); None: plain TCP."""
        return None

    # -- the native engine holds the sockets (splice.py) ----------------------
    def native_started(self, slot: int) -> None:
        """The engine now forwards this tunnel's sockets under ``slot``."""
        check(WHERE_TRANSITIONS, self.where, Where.NATIVE)
        self.where = Where.NATIVE
        self.slot = slot

    def native_finished(self, reason: str, nin: int, nout: int, *ws: int) -> None:
        """Called by the engine once both sockets are closed (and by abort); ``ws``: the
        websocket messages each way and ws_rules.CloseKind (wstunnel.WsLink takes them)."""
        check(WHERE_TRANSITIONS, self.where, Where.NATIVE_DONE)
        self.where = Where.NATIVE_DONE
        self.slot = -1
        self.client.nbytes += nin
        self.nbytes += nout
        if not self.reason:
            self.reason = reason
        self.lost = 2
        self.finish()

    def _native_go_away(self) -> None:
        splicer = self.ctx.splicer
        if self.where is not Where.NATIVE or splicer is None:
            return
        slot = self.slot
        splicer.engine.go_away(slot, self)
        # the peers get GRACE seconds to close their sides, as with Parting
        self.ctx.loop.call_later(GRACE, self._grace_over, slot)

    def _grace_over(self, slot: int) -> None:
        if self.where is Where.NATIVE and self.slot == slot:
            self.abort(self.reason)
