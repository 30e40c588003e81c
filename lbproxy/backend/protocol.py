"""Asyncio I/O of the reference backend: one Protocol per connection around the sans-IO wire."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, cast

from lbproxy.backend.interfaces import ChatService, ConnectionHost, WsHandler
from lbproxy.backend.routes import Response, StreamResponse, route_http, slow_body
from lbproxy.backend.wire import (
    DEFAULT_MAX_MESSAGE,
    Header,
    HttpRequest,
    ServerConnection,
    WebSocketRequest,
    WsClosed,
    WsMessage,
    WsMessageTooBig,
)

log = logging.getLogger(__name__)

PAUSE_WRITE = 1  # the transport's write buffer is above its high-water mark
PAUSE_BUSY = 2  # a streamed response or a websocket admission is in progress
PAUSE_HANDLER = 4  # the websocket handler has too much queued work
CLOSE_GRACE = 2.0  # seconds clients get to answer our close frame before the transport is cut


class Connection(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, then maybe a websocket (/echo or /chat).

    An ``interfaces.WsConnectionPeer`` for its chat session and an
    ``interfaces.ServedConnection`` for its server.
    """

    __slots__ = (
        "_paused",
        "_task",
        "_writable",
        "conn",
        "handler",
        "is_websocket",
        "server",
        "transport",
    )

    def __init__(self, server: ConnectionHost) -> None:
        self.server = server
        self.conn = ServerConnection()
        self.transport: asyncio.Transport | None = None
        self.handler: WsHandler | None = None  # None on an accepted websocket means echo
        self.is_websocket = False
        self._paused = 0
        self._writable: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.conn.must_close:
            self.conn.receive_data(b"")
            self._process()
        self._forget()
        self.server.connections.discard(self)
        self.server.changed.set()
        if self._task is not None:
            self._task.cancel()
        self._wake_writer()

    def pause_writing(self) -> None:
        self._pause(PAUSE_WRITE)

    def resume_writing(self) -> None:
        self._resume(PAUSE_WRITE)
        self._wake_writer()

    # ---- WsConnectionPeer -----------------------------------------------------------------

    def send_text(self, text: str) -> bool:
        sent = self.conn.send_message(text)
        self._flush()
        return sent

    def close(self, code: int, reason: str = "") -> None:
        self.conn.close_websocket(code, reason)
        self._flush()
        if self.transport is not None and not self.transport.is_closing():
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self.abort)

    def hold_reading(self, hold: bool) -> None:
        if hold:
            self._pause(PAUSE_HANDLER)
        else:
            self._resume(PAUSE_HANDLER)

    def write_buffer_size(self) -> int:
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    # ---- internals --------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        was = self._paused
        self._paused &= ~reason
        transport = self.transport
        if was and not self._paused and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data = self.conn.data_to_send()
        if data:
            transport.write(data)
        if self.conn.must_close:
            transport.close()

    def _forget(self) -> None:
        if self.is_websocket:
            self.is_websocket = False
            self.server.websockets.discard(self)
            self.server.changed.set()
            if self.handler is not None:
                self.handler.on_closed()

    def _process(self) -> None:
        while not self._paused & PAUSE_BUSY:
            events = self.conn.next_events()
            if not events:
                break
            for event in events:
                self._dispatch(event)
        self._flush()

    def _dispatch(
        self, event: HttpRequest | WebSocketRequest | WsMessage | WsMessageTooBig | WsClosed
    ) -> None:
        if isinstance(event, WsMessage):
            if self.handler is None:
                self.conn.send_message(event.data)
            else:
                self.handler.on_message(event.data)
        elif isinstance(event, HttpRequest):
            self._on_request(event)
        elif isinstance(event, WebSocketRequest):
            self._on_upgrade(event)
        elif isinstance(event, WsMessageTooBig):
            if self.handler is None:
                self.conn.close_websocket(1009, "message too big")
            else:
                self.handler.on_too_big(event.size)
        else:
            self._forget()

    def _on_request(self, request: HttpRequest) -> None:
        response = route_http(request, self.server.view())
        if isinstance(response, Response):
            head_only = request.method == "HEAD"
            self.conn.send_response(
                response.status, response.headers, response.body, head_only=head_only
            )
            return
        self._start_task(self._stream(response, request.method == "HEAD"))

    def _on_upgrade(self, request: WebSocketRequest) -> None:
        path = request.path
        if path not in ("/echo", "/chat"):
            self.conn.reject_websocket(404, b"not found\n")
        elif self.server.draining:
            self.conn.reject_websocket(503, b"draining\n")
        elif path == "/echo":
            self.conn.max_message = DEFAULT_MAX_MESSAGE
            self._accept([], None)
        elif self.server.chat is None:
            self.conn.reject_websocket(503, b"chat needs a backend started with --redis\n")
        else:
            self._start_task(self._admit(self.server.chat, request))

    def _accept(self, headers: list[Header], handler: WsHandler | None) -> None:
        self.conn.accept_websocket(headers)
        self.handler = handler
        self.is_websocket = True
        self.server.websockets.add(self)

    def _start_task(self, coro: Coroutine[Any, Any, None]) -> None:
        self._pause(PAUSE_BUSY)
        self._task = asyncio.get_running_loop().create_task(coro)
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("connection task failed", exc_info=task.exception())
            self.abort()
            return
        self._resume(PAUSE_BUSY)
        if self.transport is not None and not self.transport.is_closing():
            self._process()

    async def _admit(self, chat: ChatService, request: WebSocketRequest) -> None:
        outcome = await chat.admit(request)
        if self.transport is None or self.transport.is_closing():
            return
        if isinstance(outcome, Response):
            self.conn.reject_websocket(outcome.status, outcome.body)
        else:
            user, headers = outcome
            self.conn.max_message = chat.max_message
            self._accept(headers, None)
            self.handler = chat.attach(self, user)
        self._flush()

    async def _stream(self, response: StreamResponse, head_only: bool) -> None:
        self.conn.start_stream(response.status, response.headers)
        offset = 0
        while offset < response.total and not head_only:
            size = min(response.chunk, response.total - offset)
            if not await self._drained():
                return
            self.conn.send_chunk(slow_body(offset, size))
            self._flush()
            offset += size
            if response.delay:
                await asyncio.sleep(response.delay)
        if await self._drained():
            self.conn.end_stream()
            self._flush()

    async def _drained(self) -> bool:
        """Wait until the transport accepts more data; False once it is closing."""
        while self._paused & PAUSE_WRITE:
            if self.transport is None or self.transport.is_closing():
                return False
            self._writable = asyncio.get_running_loop().create_future()
            await self._writable
        return self.transport is not None and not self.transport.is_closing()
