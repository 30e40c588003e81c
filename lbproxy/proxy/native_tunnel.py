"""A tunnel the native engine forwards: what an established native tunnel costs in Python.

The engine (``_splice.c``) holds the two sockets, their buffers, the frame cursors and the
tunnel and websocket rules; Python keeps one ``NativeTunnel`` per tunnel, because the pool
(drain), the listener (idle sweep, pings, byte sampler, shutdown), the engine's end report
and the upgrade hand-over (handover.py) need an object to talk to: the backend, the
client's address and start time (access log), the bytes and websocket messages counted
outside the engine, the close kind and who sent the first close (ws_rules), the engine
slot, and where the tunnel is (tunnel_rules.Where).

A websocket upgrade the engine connected (native_upgrade.py), or a tunnel taken over from
a previous generation, is a bare ``NativeTunnel``: no transports, no ``ClientHalf``. The
Python tunnel (tunnel.Link, a subclass; wstunnel.WsLink) becomes native when
``Splicer.offload`` moves its sockets; it then runs the same code.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from lbproxy.core.tunnel_rules import (
    FORWARD,
    NATIVE,
    NATIVE_DONE,
    PYTHON,
    WHERE_TRANSITIONS,
    Side,
    check,
)
from lbproxy.core.ws_rules import REASON_TEXT, CloseKind, close_reason
from lbproxy.proxy.accesslog import log_connection

if TYPE_CHECKING:
    from lbproxy.core.pool import Backend
    from lbproxy.proxy.context import ListenerContext

GRACE = 5.0  # seconds a going-away peer gets to close its side before we close it
NO_CLOSE = CloseKind.NONE  # (an Enum member as a global: see tunnel_rules.py)
DRAIN = CloseKind.DRAIN


class NativeTunnel(Side):
    """One tunnel the engine forwards (a websocket from a native upgrade or a hand-over, or a
    Link moved into the engine). ``mode`` (Side) is the backend side's while Python forwards.
    ``ws``: a websocket (messages, close kinds); ``msgs_in``/``messages``: its data messages
    (client -> backend, backend -> client) counted outside the engine and the Python scanner."""

    __slots__ = (
        "backend",
        "client_addr",
        "ctx",
        "first_close",
        "flushed_in",
        "flushed_msgs",
        "flushed_out",
        "messages",
        "msgs_in",
        "nbytes",
        "nbytes_in",
        "reason",
        "slot",
        "started",
        "where",
        "ws",
        "ws_close",
    )

    def __init__(
        self,
        ctx: ListenerContext,
        backend: Backend,
        client_addr: str,
        started: float,
        ws: bool = True,
    ) -> None:
        self.ctx = ctx
        self.backend = backend
        self.client_addr = client_addr
        self.started = started
        self.ws = ws
        self.nbytes = 0  # backend -> client bytes counted in Python (the engine adds its own)
        self.nbytes_in = 0  # client -> backend bytes counted in Python before the engine
        self.flushed_in = 0
        self.flushed_out = 0
        self.msgs_in = self.messages = 0
        self.flushed_msgs = (0, 0)
        self.ws_close = NO_CLOSE
        self.first_close = 0  # who sent the first close frame (ws_rules.CLOSERS)
        self.reason = ""
        self.slot = -1  # the engine's slot while it forwards the tunnel
        self.where = PYTHON
        self.mode = FORWARD

    # -- the engine's side ----------------------------------------------------
    def native_started(self, slot: int) -> None:
        """The engine now forwards this tunnel's sockets under ``slot``."""
        if (self.where, NATIVE) not in WHERE_TRANSITIONS:  # (the table: no call when legal)
            check(WHERE_TRANSITIONS, self.where, NATIVE)
        self.where = NATIVE
        self.slot = slot

    def native_finished(
        self,
        reason: str,
        nin: int,
        nout: int,
        msgs_in: int = 0,
        msgs_out: int = 0,
        kind: int = 0,
        first: int = 0,
    ) -> None:
        """Called by the engine once both sockets are closed (and by abort), with the
        websocket messages each way, its ws_rules.CloseKind and who closed first."""
        if (self.where, NATIVE_DONE) not in WHERE_TRANSITIONS:
            check(WHERE_TRANSITIONS, self.where, NATIVE_DONE)
        self.where = NATIVE_DONE
        self.slot = -1
        self.nbytes_in += nin
        self.nbytes += nout
        if not self.reason:
            self.reason = reason
        if self.ws:
            self.msgs_in += msgs_in
            self.messages += msgs_out
            self.first_close = self.first_close or first
            if kind and self.ws_close != kind:  # (the engine's close wins)
                self.ws_close = CloseKind(kind)
                self.reason = REASON_TEXT.get(self.ws_close, self.reason)
        self.finish()

    def native_closed(self, kind: int) -> None:
        """The engine closed it itself (its sweep: a dead client, a refused frame): the
        peers get GRACE to close their sides, as after a drain."""
        if self.where is not NATIVE:
            return
        self.ws_close = CloseKind(kind)
        self.reason = REASON_TEXT[self.ws_close]
        self.ctx.loop.call_later(GRACE, self._grace_over, self.slot)

    def finish(self) -> None:
        """Both sides are closed: out of the listener, the pool and the client's admission
        count; counts, close metric, access log."""
        ctx = self.ctx
        if self.ws:
            label = close_reason(self.ws_close, self.first_close, self.reason)
            if label is not None:
                ctx.stats.ws_closes[(ctx.pool.name, label)] += 1
        ctx.tunnel_ended(self, self.backend, self.client_addr)
        self.flush_bytes()
        if ctx.access_log:
            nin, nout = self.totals()
            elapsed = time.monotonic() - self.started
            log_connection(
                ctx,
                self.client_addr,
                self.backend,
                elapsed,
                nin,
                nout,
                self.reason,
                messages=self.message_counts(),
            )

    # -- counts -------------------------------------------------------------------
    def totals(self) -> tuple[int, int]:
        """Bytes (client -> backend, backend -> client) so far."""
        nin, nout = self.nbytes_in, self.nbytes  # (counted in Python; Link adds its client's)
        splicer = self.ctx.splicer
        if self.where is not NATIVE or splicer is None:
            return nin, nout
        ein, eout = splicer.engine.counts(self.slot, self)
        return nin + ein, nout + eout

    def message_counts(self) -> tuple[int, int] | None:
        """Websocket data messages (client -> backend, backend -> client); None: plain TCP."""
        if not self.ws:
            return None
        msgs_in, msgs_out = self.msgs_in, self.messages  # (WsLink adds its scanner's)
        splicer = self.ctx.splicer
        if self.where is NATIVE and splicer is not None:
            nin, nout, _, _ = splicer.engine.messages(self.slot, self)
            return msgs_in + nin, msgs_out + nout
        return msgs_in, msgs_out

    def flush_bytes(self) -> None:
        """Byte (and message) counts into the shared counters (sampler, sweep, finish)."""
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
        if not self.ws:
            return
        msgs_in, msgs_out = self.message_counts() or (0, 0)
        was_in, was_out = self.flushed_msgs
        if msgs_in != was_in or msgs_out != was_out:
            stats.ws_messages[(pool, backend, "in")] += msgs_in - was_in
            stats.ws_messages[(pool, backend, "out")] += msgs_out - was_out
            self.flushed_msgs = (msgs_in, msgs_out)

    def activity(self) -> int:
        total_in, total_out = self.totals()
        return total_in + total_out

    # -- what the pool and the listener ask (context.Tracked, pool_types.Closable) --
    def finish_request(self) -> None:
        pass  # (a tunnel: the drain decides)

    def go_away(self) -> None:
        """Drain: the engine sends a websocket's 1001 at a frame boundary, or half-closes a
        plain tunnel (the rule is tunnel_rules', given to the engine at start)."""
        if not self.ws:
            self.reason = self.reason or "drained"
        elif self.ws_close is not NO_CLOSE:
            return
        else:
            self.ws_close = DRAIN
            self.reason = "drained (1001 going away)"
        self._go_away()

    def _go_away(self) -> None:
        self._native_go_away()

    def abort(self, reason: str) -> None:
        """Close now (idle timeout, shutdown, the grace after a go-away)."""
        splicer = self.ctx.splicer
        if self.where is not NATIVE or splicer is None:
            return
        slot = self.slot
        if self.ws:  # (the counts before the close; lbproxy's own close kind wins here)
            msgs_in, msgs_out, kind, first = splicer.engine.messages(slot, self)
            self.msgs_in += msgs_in
            self.messages += msgs_out
            self.ws_close = self.ws_close or CloseKind(kind)
            self.first_close = self.first_close or first
        self.reason = reason
        nin, nout = splicer.engine.close(slot, self)
        self.native_finished(reason, nin, nout)

    def _native_go_away(self) -> None:
        splicer = self.ctx.splicer
        if self.where is not NATIVE or splicer is None:
            return
        slot = self.slot
        splicer.engine.go_away(slot, self)
        # the peers get GRACE seconds to close their sides, as with Parting
        self.ctx.loop.call_later(GRACE, self._grace_over, slot)

    def _grace_over(self, slot: int) -> None:
        if self.where is NATIVE and self.slot == slot:
            self.abort(self.reason)
