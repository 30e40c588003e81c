"""The websocket tunnel of the Python engine: tunnel.Link plus frames (ws_rules).

Backend -> client frame boundaries are followed (wsframe.FrameScan) so that lbproxy's own
frames (the drain's 1001, a refusal's 1009/1008, a ping) go out between frames; client ->
backend frames are followed by wsscan.ClientFrames (messages, limits). The same WsLink
stays in charge when the native engine forwards the sockets (``where`` is NATIVE): then
the engine applies the same rules and reports its counts.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

from lbproxy.core.tunnel_rules import PYTHON, GoAway, go_away
from lbproxy.core.ws_rules import (
    DATA,
    OPCODES,
    PING_FRAME,
    REASON_TEXT,
    CloseKind,
    Tick,
    Verdict,
    closes,
    sweep_action,
)
from lbproxy.core.wsframe import FrameScan
from lbproxy.core.wsscan import ClientFrames
from lbproxy.proxy.native_tunnel import NativeTunnel
from lbproxy.proxy.tunnel import ClientHalf, Link

if TYPE_CHECKING:
    from lbproxy.core.pool import Backend
    from lbproxy.proxy.context import ListenerContext


class WsClientHalf(ClientHalf):
    """Client side of a websocket tunnel: its frames are followed on their way."""

    __slots__ = ("refused", "scan")

    link: WsLink

    def __init__(self, link: WsLink, transport: asyncio.Transport) -> None:
        super().__init__(link, transport)
        self.scan = ClientFrames(link.ctx.ws_policy)
        self.refused = False  # a frame was refused: nothing more goes on

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.nbytes += n
        scan = self.scan
        if n <= scan.skip and not scan.head:  # inside a frame's payload
            scan.skip -= n
            self.out.write(data)
            return
        if self.refused:
            return
        now = time.monotonic() if scan.policy.emission else 0.0
        out, verdict = scan.feed(data, now)
        if out:
            self.out.write(out)
        link = self.link
        if scan.closing and not link.first_close:
            link.first_close = 2 if link.saw_close else 1
        if verdict is not Verdict.PASS:
            self.refused = True
            self.link.refuse(CloseKind(verdict))


class WsLink(Link, FrameScan):
    """A websocket tunnel: follows frames both ways (drain, limits, pings, messages)."""

    __slots__ = (
        "draining",
        "heard",
        "heard_at",
        "partial",
        "pinged",
        "saw_close",
        "skip",
        "want_ping",
    )

    WS = True
    client: WsClientHalf

    def __init__(
        self,
        ctx: ListenerContext,
        backend: Backend,
        transport: asyncio.Transport,
        client_transport: asyncio.Transport,
        client_addr: str,
        started: float,
    ) -> None:
        super().__init__(ctx, backend, transport, client_transport, client_addr, started)
        self.client = WsClientHalf(self, client_transport)
        self.skip = 0
        self.partial = b""
        self.saw_close = False  # (messages: backend -> client; the client's: client.scan)
        self.draining = False  # go-away waits for the frame in flight to end
        self.want_ping = False  # a ping waits for the frame in flight to end
        self.heard = -1  # the client's byte count at the last ping sweep
        self.heard_at = 0.0
        self.pinged = False

    def start(
        self, to_client: bytes, to_backend: bytes, head_len: int = 0, key: bytes | None = None
    ) -> None:
        """``to_client`` is the 101 response head (``head_len`` bytes) plus any first frames;
        ``to_backend`` the client's frames that came with its request."""
        if len(to_client) > head_len:
            self.feed(to_client[head_len:])
        if to_backend:
            to_backend, verdict = self.client.scan.feed(to_backend, time.monotonic())
            if verdict is not Verdict.PASS:
                self.client.refused = True
                self.ws_close = CloseKind(verdict)
        super().start(to_client, to_backend, offload=self.ws_close is CloseKind.NONE, key=key)
        if self.ws_close is not CloseKind.NONE:
            self.reason = REASON_TEXT[self.ws_close]
            self._go_away()

    # -- backend -> client -------------------------------------------------
    def data_received(self, data: bytes) -> None:
        n = len(data)
        skip = self.skip
        if n < skip:  # inside a frame (a split header has skip == 0)
            self.nbytes += n
            self.out.write(data)
            self.skip = skip - n
            return
        # The common case: exactly one small unmasked non-close frame, at a boundary before
        # and after (so never while waiting for a boundary, which is only between them).
        b0 = data[0]
        if skip == 0 and 1 < n < 127 and data[1] == n - 2 and b0 & 0x0F != 0x8 and not self.partial:
            self.nbytes += n
            self.out.write(data)
            if b0 & 0x80 and OPCODES[b0 & 0x0F] & DATA:
                self.messages += 1
            return
        if not (self.draining or self.want_ping):  # frame headers in this chunk
            self.nbytes += n
            self.out.write(data)
            if n == skip:  # (it ends a frame exactly)
                self.skip = 0
            else:
                self.feed(data)
            return
        self._to_boundary(data)

    def _to_boundary(self, data: bytes) -> None:
        """Forward up to the end of the frame in flight, then the drain's rule (what comes
        after is not forwarded) or the ping (what comes after follows it)."""
        k = self.to_boundary(data)
        head = data if k < 0 else data[:k]
        if head:
            self.nbytes += len(head)
            self.out.write(head)
            self.feed(head)
        if k < 0:
            return
        if self.draining:
            self.draining = False
            self._go_away_now()
            return
        self.want_ping = False
        self.out.write(PING_FRAME)
        if k < len(data):
            self.data_received(data[k:])

    # -- lbproxy closes --------------------------------------------------------
    def go_away(self) -> None:
        if self.ws_close is not CloseKind.NONE:
            return
        self.ws_close = CloseKind.DRAIN
        self.reason = "drained (1001 going away)"
        self._go_away()

    def refuse(self, kind: CloseKind) -> None:
        """A client frame over a limit (wsscan): close frames at the next boundary."""
        if self.ws_close is not CloseKind.NONE:
            return
        self.ws_close = kind
        self.reason = REASON_TEXT[kind]
        self._go_away()

    def _go_away_action(self) -> GoAway:
        return go_away(True, self.saw_close, self.at_boundary)

    def _wait_boundary(self) -> None:
        self.draining = True

    def _close_frames(self) -> None:
        to_client, to_backend = closes(os.urandom(4))[self.ws_close or CloseKind.DRAIN]
        if to_client:
            self.out.write(to_client)
        if to_backend:
            self.transport.write(to_backend)

    # -- pings (the listener's sweep) -------------------------------------------
    def ping_tick(self, now: float) -> None:
        """One sweep tick of a tunnel the Python engine forwards."""
        if self.ws_close is not CloseKind.NONE:
            return
        heard = self.client.nbytes
        if heard != self.heard:  # any byte from the client: alive
            self.heard, self.heard_at, self.pinged = heard, now, False
            return
        action = sweep_action(now - self.heard_at, self.pinged, self.ctx.ws_policy)
        if action is Tick.PING:
            self.pinged = True
            if self.at_boundary and not self.draining:
                self.out.write(PING_FRAME)
            else:
                self.want_ping = True
        elif action is Tick.DEAD:
            self.dead_peer()

    def dead_peer(self) -> None:
        """The client is gone: its TCP is closed now, the backend gets a 1001 (at a client
        frame boundary) and its connection closes once that is flushed."""
        self.ws_close = CloseKind.DEAD_PEER
        self.reason = REASON_TEXT[CloseKind.DEAD_PEER]
        if self.client.scan.at_boundary:
            self.transport.write(closes(os.urandom(4))[CloseKind.DEAD_PEER][1])
        self.out.abort()  # (side_lost closes the backend side after its flush)

    # -- counts ------------------------------------------------------------------
    def message_counts(self) -> tuple[int, int]:
        """Data messages each way: the engine's and the hand-over's (NativeTunnel) plus what
        the Python scanner counted."""
        msgs_in, msgs_out = NativeTunnel.message_counts(self) or (0, 0)
        return msgs_in + self.client.scan.messages, msgs_out

    def finish(self) -> None:
        if not self.first_close and self.saw_close:
            self.first_close = 2  # (the backend's close frame went by in Python)
        super().finish()  # (the close metric, the counts)


def ws_sweep(ctx: ListenerContext, now: float) -> None:
    """The pings of one listener, once per sweep tick: its engine's tunnels in C, those the
    Python tunnel forwards here (no timer per connection)."""
    splicer = ctx.splicer
    if splicer is not None:
        splicer.sweep(now)
    if not ctx.ws_policy.pings:
        return
    for conn in list(ctx.connections):
        if isinstance(conn, WsLink) and conn.where is PYTHON and conn.lost == 0:
            conn.ping_tick(now)
