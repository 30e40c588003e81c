"""The tunnel protocols against fake transports: forwarding, flow control, 1001 injection."""

from __future__ import annotations

import asyncio

from lbproxy.config_types import Address, BackendConfig, ListenerConfig, PoolConfig
from lbproxy.pool import Pool
from lbproxy.proxy.context import ListenerContext
from lbproxy.proxy.tunnel import GOING_AWAY_FRAME, Parting, WsLink
from lbproxy.stats import Stats
from tests.test_wsframe import frame


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.reading = True
        self.eof = False
        self.closed = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def make_link() -> tuple[WsLink, FakeTransport, FakeTransport]:
    loop = asyncio.get_running_loop()
    pool = Pool(PoolConfig("p", backends=(BackendConfig("b", Address("127.0.0.1", 1)),)))
    ctx = ListenerContext(ListenerConfig("l", Address("127.0.0.1", 0), "p"), pool, Stats(), loop)
    backend_t, client_t = FakeTransport(), FakeTransport()
    link = WsLink(ctx, pool.backends["b"], backend_t, client_t, "127.0.0.1", 0.0)
    link.start(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", b"", head_len=36)
    client_t.written.clear()
    return link, backend_t, client_t


async def test_forwarding_and_flow_control() -> None:
    link, backend_t, client_t = make_link()
    link.client.data_received(b"to backend")
    assert backend_t.written == b"to backend"
    link.data_received(frame(0x1, b"hi"))
    assert client_t.written == frame(0x1, b"hi")
    link.pause_writing()  # backend transport's buffer full -> stop reading the client
    assert not client_t.reading
    link.resume_writing()
    assert client_t.reading
    link.client.pause_writing()  # client transport full -> stop reading the backend
    assert not backend_t.reading
    assert link.backend.active == 1 and link in link.backend.connections


async def test_going_away_waits_for_the_frame_boundary() -> None:
    link, backend_t, client_t = make_link()
    big = frame(0x2, b"x" * 1000)
    link.data_received(big[:300])  # a frame in flight
    link.go_away()
    assert client_t.written == big[:300]  # nothing injected mid-frame
    after = frame(0x1, b"next message")
    link.data_received(big[300:] + after)
    # the rest of the frame, then the close frame; the next message is not forwarded
    assert client_t.written == big + GOING_AWAY_FRAME
    assert client_t.eof and backend_t.eof  # FIN both ways, no reset
    assert isinstance(client_t.protocol, Parting) and isinstance(backend_t.protocol, Parting)


async def test_going_away_at_boundary_is_immediate() -> None:
    link, _backend_t, client_t = make_link()
    link.data_received(frame(0x1, b"a") + frame(0x1, b"b" * 200))
    link.go_away()
    assert client_t.written.endswith(GOING_AWAY_FRAME)
    assert client_t.eof


async def test_backend_close_frame_is_not_doubled() -> None:
    link, _backend_t, client_t = make_link()
    close = frame(0x8, b"\x03\xe8")
    link.data_received(close)
    link.go_away()
    assert client_t.written == close  # the backend already said goodbye
    assert client_t.eof
