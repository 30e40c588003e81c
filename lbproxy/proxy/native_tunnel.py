"""A tunnel the native engine forwards: what an established native tunnel costs in Python.

The engine (``_splice.c``) holds the two sockets, their buffers, the frame cursor and the
tunnel rules; Python keeps one ``NativeTunnel`` per tunnel, because the pool (drain), the
listener (idle sweep, byte sampler, shutdown) and the engine's end report need an object to
talk to: the backend, the client's address and start time (access log), the bytes counted
before the engine took over, the engine slot, and where the tunnel is (tunnel_rules.Where).

A websocket upgrade the engine connected (native_upgrade.py) is a bare ``NativeTunnel`` from
its start: no transports, no ``ClientHalf``. The Python tunnel (tunnel.Link, a subclass)
becomes native when ``Splicer.offload`` moves its sockets; it then runs the same code.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from lbproxy.proxy.accesslog import log_connection
from lbproxy.proxy.tunnel_rules import (
    FORWARD,
    NATIVE,
    NATIVE_DONE,
    PYTHON,
    WHERE_TRANSITIONS,
    Side,
    check,
)
from lbproxy.proxy.wsframe import FrameScan

if TYPE_CHECKING:
    from lbproxy.pool import Backend
    from lbproxy.proxy.context import ListenerContext

GRACE = 5.0  # seconds a going-away peer gets to close its side before we close it


class Cursor(FrameScan):
    """A frame cursor on its own: where the first frames sent with a 101 leave the stream,
    for the engine to carry on from (``engine.splice``)."""

    __slots__ = ("partial", "saw_close", "skip")

    def __init__(self) -> None:
        self.skip = 0
        self.partial = b""
        self.saw_close = False


class NativeTunnel(Side):
    """One tunnel the engine forwards (a websocket from a native upgrade, or a Link moved
    into the engine). ``mode`` (Side) is the backend side's mode while Python forwards."""

    __slots__ = (
        "backend",
        "client_addr",
        "ctx",
        "flushed_in",
        "flushed_out",
        "nbytes",
        "nbytes_in",
        "reason",
        "slot",
        "started",
        "where",
    )

    def __init__(
        self, ctx: ListenerContext, backend: Backend, client_addr: str, started: float
    ) -> None:
        self.ctx = ctx
        self.backend = backend
        self.client_addr = client_addr
        self.started = started
        self.nbytes = 0  # backend -> client bytes counted in Python (the engine adds its own)
        self.nbytes_in = 0  # client -> backend bytes counted in Python before the engine
        self.flushed_in = 0
        self.flushed_out = 0
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

    def native_finished(self, reason: str, nin: int, nout: int) -> None:
        """Called by the engine once both sockets are closed (and by abort)."""
        if (self.where, NATIVE_DONE) not in WHERE_TRANSITIONS:
            check(WHERE_TRANSITIONS, self.where, NATIVE_DONE)
        self.where = NATIVE_DONE
        self.slot = -1
        self.nbytes_in += nin
        self.nbytes += nout
        if not self.reason:
            self.reason = reason
        self.finish()

    def finish(self) -> None:
        """Both sides are closed: out of the listener and the pool, counts, access log."""
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.pool.detach(self.backend, self)
        self.flush_bytes()
        if ctx.access_log:
            nin, nout = self.totals()
            started, reason = self.started, self.reason
            elapsed = time.monotonic() - started
            log_connection(ctx, self.client_addr, self.backend, elapsed, nin, nout, reason)

    # -- byte counts ------------------------------------------------------------
    def totals(self) -> tuple[int, int]:
        """Bytes (client -> backend, backend -> client) so far."""
        nin, nout = self.nbytes_in, self.nbytes  # (counted in Python; Link adds its client's)
        splicer = self.ctx.splicer
        if self.where is not NATIVE or splicer is None:
            return nin, nout
        ein, eout = splicer.engine.counts(self.slot, self)
        return nin + ein, nout + eout

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

    def activity(self) -> int:
        total_in, total_out = self.totals()
        return total_in + total_out

    # -- what the pool and the listener ask (context.Tracked, pool_types.Closable) --
    def finish_request(self) -> None:
        pass  # (a tunnel: the drain decides)

    def go_away(self) -> None:
        """Drain a websocket: the engine sends the 1001 at a frame boundary (the rule is
        tunnel_rules', given to the engine at start)."""
        if self.reason.startswith("drained"):
            return
        self.reason = "drained (1001 going away)"
        self._go_away()

    def _go_away(self) -> None:
        self._native_go_away()

    def abort(self, reason: str) -> None:
        """Close now (idle timeout, shutdown, the grace after a go-away)."""
        splicer = self.ctx.splicer
        if self.where is not NATIVE or splicer is None:
            return
        self.reason = reason
        nin, nout = splicer.engine.close(self.slot, self)
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
