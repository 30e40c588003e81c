"""How a tunnel side ends gracefully (Parting), and the lingering close of an error
response (Linger): protocols that take over a transport whose forwarding is over."""

from __future__ import annotations

import asyncio
from typing import Protocol

from lbproxy.core.tunnel_rules import Mode, Side


class Tunnel(Protocol):
    """What Parting needs of the tunnel it belongs to (tunnel.Link)."""

    lost: int

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def finish(self) -> None: ...


class Parting(asyncio.Protocol):
    """Takes over a tunnel side being closed gracefully: FIN sent, then its ``Side`` mode
    says what its input does — DROP: read and dropped until the peer closes;
    CLOSE_ON_DATA: anything (the client's close reply) closes it.

    The transport is closed when the peer closes its side, or after ``grace`` seconds.
    """

    __slots__ = ("link", "side", "timer", "transport")

    def __init__(self, transport: asyncio.Transport, link: Tunnel, side: Side) -> None:
        self.transport = transport
        self.link = link
        self.side = side
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def take_over(
        cls, transport: asyncio.Transport, link: Tunnel, side: Side, mode: Mode, grace: float
    ) -> None:
        """``side`` moves to ``mode``; ``transport`` is closed after ``grace`` at the latest."""
        if transport.is_closing():
            return
        side.move(mode)
        parting = cls(transport, link, side)
        transport.set_protocol(parting)
        if not transport.can_write_eof():  # TLS has no half-close: flush, close_notify, close
            transport.close()
            return
        transport.resume_reading()
        transport.write_eof()
        parting.timer = link.loop.call_later(grace, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.side.mode is Mode.CLOSE_ON_DATA:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # the peer finished too: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.side.move(Mode.CLOSED)
        self.link.lost += 1
        if self.link.lost == 2:
            self.link.finish()


class Linger(asyncio.Protocol):
    """Lingering close (as NGINX does after an error response): FIN, then drop input.

    Closing a socket that still has unread input makes the kernel send a reset,
    which can destroy the response before the client reads it; this reads and
    drops what the client still sends until it closes, or for LINGER seconds.
    """

    __slots__ = ("timer", "transport")

    LINGER = 2.0

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def close(cls, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        if transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        linger = cls(transport)
        transport.set_protocol(linger)
        transport.write_eof()
        transport.resume_reading()
        linger.timer = loop.call_later(cls.LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
