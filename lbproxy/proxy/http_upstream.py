"""http mode (L7), backend side: read the response head, forward the body, reuse the connection."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

from lbproxy.core.http1 import (
    MAX_HEAD,
    ChunkedTracker,
    LengthTracker,
    add_response_headers,
    parse_response_head,
    rewrite_response,
)
from lbproxy.core.http1.lanes import match_quick_response, switching_protocols
from lbproxy.core.pool import Backend, BackendState
from lbproxy.core.retry import Failure
from lbproxy.core.states import UPSTREAM_TRANSITIONS, UpstreamState, check
from lbproxy.errors import HttpError
from lbproxy.proxy.connect import HIGH_WATER
from lbproxy.proxy.context import ListenerContext

if TYPE_CHECKING:
    from lbproxy.proxy.types import ClientSide

IDLE, HEAD, BODY = UpstreamState
UP = BackendState.UP  # (Enum members as globals: see tunnel_rules)


class Upstream(asyncio.Protocol):
    """One keep-alive connection to a backend, serving one request at a time."""

    __slots__ = (
        "backend",
        "buf",
        "client",
        "ctx",
        "got_response",
        "http10",
        "keep",
        "method",
        "set_cookie",
        "state",
        "tracker",
        "transport",
        "websocket",
    )

    def __init__(self, ctx: ListenerContext, backend: Backend) -> None:
        self.ctx = ctx
        self.backend = backend
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: ClientSide | None = None
        self.buf = bytearray()
        self.state: UpstreamState = IDLE
        self.method = b"GET"
        self.websocket = False
        self.set_cookie: tuple[bytes, bytes] | None = None
        self.tracker: ChunkedTracker | LengthTracker | None = None
        self.keep = True
        self.got_response = False
        self.http10 = False  # the client speaks HTTP/1.0: say "keep-alive" when it is kept

    def _to(self, new: UpstreamState) -> None:
        """The one place the connection changes state (states.UPSTREAM_TRANSITIONS)."""
        if new not in UPSTREAM_TRANSITIONS[self.state]:
            check(UPSTREAM_TRANSITIONS, self.state, new)  # (raises IllegalTransition)
        self.state = new

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def expect(
        self,
        client: ClientSide,
        method: bytes,
        websocket: bool,
        set_cookie: tuple[bytes, bytes] | None,
    ) -> None:
        """A request is about to be written: get ready for its response."""
        self.client = client
        self.method = method
        self.websocket = websocket
        self.set_cookie = set_cookie
        if HEAD not in UPSTREAM_TRANSITIONS[self.state]:  # (the table, checked with no call)
            check(UPSTREAM_TRANSITIONS, self.state, HEAD)
        self.state = HEAD
        self.got_response = False
        head = client.head
        self.http10 = head is not None and head.version == b"1.0"
        self.buf.clear()
        self.transport.resume_reading()

    # -- asyncio callbacks ---------------------------------------------------
    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is BODY:
            self._body(data)
        elif state is HEAD:
            if not self.got_response:
                self.got_response = True
                if self.backend.failures:  # (no call per request when there is none)
                    self.ctx.pool.connect_succeeded(self.backend)
            if self.websocket and not self.buf and self._quick_switch(data):
                return
            if (
                not self.buf
                and self.set_cookie is None
                and self.method == b"GET"
                and not self.websocket
                and not self.http10
                and self._quick(data)
            ):
                return
            self.buf += data
            self._head()
        else:  # an idle connection must not talk: drop it
            self.transport.close()

    def eof_received(self) -> bool:
        if self.state is BODY and self.tracker is None:  # close-delimited body ends here
            self._done(reusable=False, close_client=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self._to(IDLE)
        if state is IDLE:
            self.ctx.idle.discard(self.backend, self.transport)
            return
        client = self.client
        self.client = None
        if client is not None:
            client.upstream_failed(self.got_response, Failure.RESET if exc else Failure.CLOSED)

    def awaiting_head(self) -> bool:
        """Whether the response head has not arrived yet."""
        return self.state is HEAD

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()

    # -- response ------------------------------------------------------------
    def _quick_switch(self, data: bytes) -> bool:
        """Fast lane: a well-formed 101 answering a websocket upgrade: straight to the tunnel."""
        end = data.find(b"\r\n\r\n") + 4
        if end < 4 or not switching_protocols(data[:end]):
            return False
        client = self.client
        assert client is not None
        self._to(IDLE)
        self.client = None
        if self.set_cookie is not None:
            head = add_response_headers(data[:end], [self.set_cookie])
            client.start_tunnel(self, head + data[end:], len(head))
        else:
            client.start_tunnel(self, data, end)
        return True

    def _quick(self, data: bytes) -> bool:
        """Fast lane: a plain Content-Length response (False: use the full parser)."""
        end = data.find(b"\r\n\r\n") + 4
        if end < 4:
            return False
        # (quick_response inlined: the match on the head in place, no slice, no call)
        match = match_quick_response(data, 0, end)
        if match is None:
            return False
        status, length = match.group(1, 2)
        status = int(status)
        if status == 204 or status == 304:
            return False
        total = end + int(length)
        have = len(data)
        if have > total:  # bytes beyond the response: let the full path refuse them
            return False
        client = self.client
        assert client is not None
        client.status = status
        client.response_started()
        client.write(data)
        if have == total:
            self._done(reusable=True, close_client=False)
        else:
            self.keep = True
            self.tracker = LengthTracker(total - have)
            self._to(BODY)
        return True

    def _fail(self, detail: str) -> None:
        client = self.client
        self.client = None
        self._to(IDLE)
        self.transport.close()
        if client is not None:
            client.upstream_failed(False, Failure.BAD_RESPONSE)

    def _head(self) -> None:
        client = self.client
        if client is None:
            self.transport.close()
            return
        buf = self.buf
        while True:
            try:
                parsed = parse_response_head(buf, self.method)
            except HttpError as exc:
                self._fail(exc.reason)
                return
            if parsed is None:
                if len(buf) > MAX_HEAD:
                    self._fail("response head too large")
                return
            head, used = parsed
            if self.websocket and head.status == 101:
                raw = bytes(buf[:used])
                if self.set_cookie is not None:
                    raw = add_response_headers(raw, [self.set_cookie])
                rest = bytes(buf[used:])
                buf.clear()
                self._to(IDLE)
                self.client = None
                client.start_tunnel(self, raw + rest, len(raw))
                return
            raw = bytes(buf[:used])
            del buf[:used]
            if head.status < 200:  # 100 Continue and friends: pass on, wait for the final one
                client.write(raw)
                continue
            close = head.body.kind == "close" or client.will_close()
            extra = [self.set_cookie] if self.set_cookie is not None else []
            client.response_started()
            client.write(rewrite_response(raw, close=close, extra=extra, keep_alive=self.http10))
            client.status = head.status
            self.keep = head.keep_alive
            break
        kind = head.body.kind
        if kind == "none":
            self._done(reusable=self.keep and not buf, close_client=False)
            return
        self.tracker = (
            LengthTracker(head.body.length)
            if kind == "length"
            else ChunkedTracker(502)
            if kind == "chunked"
            else None
        )
        self._to(BODY)
        if buf:
            rest = bytes(buf)
            buf.clear()
            self._body(rest)

    def _body(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self.transport.close()
            return
        tracker = self.tracker
        if tracker is None:  # read until the backend closes
            client.write(data)
            return
        try:
            end = tracker.feed(data)
        except HttpError as exc:
            self._fail(exc.reason)
            client.transport.close()
            return
        if end < 0:
            client.write(data)
            return
        client.write(data[:end] if end < len(data) else data)
        self._done(reusable=self.keep and end == len(data), close_client=False)

    def _done(self, reusable: bool, close_client: bool) -> None:
        client = self.client
        self.client = None
        if IDLE not in UPSTREAM_TRANSITIONS[self.state]:  # (the table, checked with no call)
            check(UPSTREAM_TRANSITIONS, self.state, IDLE)
        self.state = IDLE
        self.tracker = None
        if (
            reusable
            and self.backend.state is UP
            and client is not None
            and client.tracker is None  # the request body went out whole
            and self.ctx.idle.put(self.backend, self.transport, time.monotonic())
        ):
            pass
        else:
            self.transport.close()
        if client is not None:
            client.response_done(close_client)
