"""http mode (L7), one request (uvicorn's ``RequestResponseCycle``): route, pick, connect
(connect.py, or a ``NativeUpgrade`` on the engine), forward, retry (``retry.decide``), response.
Its connection (connection.py) owns the transport, head, deadlines, keep-alive; the Upstream
sees the exchange as a ``types.ClientSide``, a native upgrade as an ``types.UpgradeClient``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from lbproxy.core.http1 import ChunkedTracker, LengthTracker, RequestHead, parse_request_head
from lbproxy.core.pool import Backend
from lbproxy.core.retry import Answer, Failure
from lbproxy.core.states import ClientState
from lbproxy.errors import HttpError
from lbproxy.proxy.connect import Connected, account, connect_with_retries
from lbproxy.proxy.deadlines import Wait
from lbproxy.proxy.exchange_failures import ExchangeFailures
from lbproxy.proxy.http_upstream import Upstream
from lbproxy.proxy.native_upgrade import NativeUpgrade
from lbproxy.proxy.routing import upstream_request
from lbproxy.proxy.wstunnel import WsLink

if TYPE_CHECKING:
    from lbproxy.proxy.context import ListenerContext
    from lbproxy.proxy.types import ConnectionSide

CONNECTING, FORWARD = ClientState.CONNECTING, ClientState.FORWARD
BODY, RESPONSE = Wait.BODY, Wait.RESPONSE  # (Enum members as globals: see tunnel_rules.py)
REPLAY_LIMIT = 65536  # request body bytes held for a resend while on a reused connection


class Exchange(ExchangeFailures):
    """One request of a client connection, until its response is done (or it fails)."""

    __slots__ = (
        "backend",
        "conn",
        "ctx",
        "head",
        "held",
        "key",
        "mark_in",
        "mark_out",
        "native",
        "quick",
        "replaying",
        "response_started",
        "reused",
        "set_cookie",
        "status",
        "task",
        "tracker",
        "transport",
        "tried",
        "upstream",
        "write",
    )

    def __init__(
        self,
        conn: ConnectionSide,
        ctx: ListenerContext,
        head: RequestHead,
        quick: bytes | None,
        key: bytes | None,
    ) -> None:
        self.conn = conn
        self.ctx = ctx
        # what the upstream calls on every response, bound once (no extra call per chunk)
        self.transport = conn.transport
        self.write = conn.write
        self.response_started = conn.response_started
        self.renew(head, quick, key)

    def renew(self, head: RequestHead, quick: bytes | None, key: bytes | None) -> None:
        """Be a new request (also the connection's next one, reusing a finished exchange)."""
        self.head = head
        self.quick = quick  # (the fast lane: the request's bytes, parsed only if resent)
        self.key = key
        self.set_cookie: tuple[bytes, bytes] | None = None
        self.backend: Backend | None = None
        self.upstream: Upstream | None = None
        self.tracker: ChunkedTracker | LengthTracker | None = None
        self.tried: frozenset[str] = frozenset()  # backends that failed this request
        self.reused = False
        self.held: bytearray | None = None  # the request body so far, while it can be resent
        self.replaying = False
        self.native: NativeUpgrade | None = None
        self.task: asyncio.Task[None] | None = None
        self.mark_in = self.mark_out = 0
        self.status = 0

    # -- route and connect -----------------------------------------------------
    def route(self, picked: Backend | None) -> None:
        """Pick (unless ``picked``) and connect, or reuse a kept-alive connection."""
        ctx = self.ctx
        pool = ctx.pool
        head = self.head
        first = None
        if not head.websocket:
            first = picked or pool.pick(self.key)
            if first is None:
                self.conn.reject(503, "no healthy backend")
                return
            idle = ctx.idle.take(first, time.monotonic(), pool.config.upstream_keepalive_timeout)
            if idle is not None:
                upstream = idle.get_protocol()
                assert isinstance(upstream, Upstream)
                self.reused = True
                self.send(first, upstream)
                return
        splicer = ctx.splicer
        if head.websocket and splicer is not None and head.body.kind == "none":
            # the native upgrade path (False from attempt: a host name, the Python path)
            native = self.native = NativeUpgrade(self, self.conn, ctx, splicer)
            if native.attempt(first):
                return
        self.task = ctx.loop.create_task(self._connect(first))

    def send_quick(self, backend: Backend, upstream: Upstream, data: bytes, now: float) -> None:
        """The fast lane: a plain GET on a warm keep-alive connection (``_attach`` inlined,
        the connection already in FORWARD: no call per request for them)."""
        ctx = self.ctx
        conn = self.conn
        pool = ctx.pool
        self.reused = True
        self.backend = conn.last_backend = backend
        self.upstream = upstream
        pool.attach(backend, conn, self.key)
        ctx.stats.requests[(pool.name, backend.id)] += 1
        self.mark_in = conn.nbytes_in - len(data)
        self.mark_out = conn.nbytes_out
        upstream.expect(self, b"GET", False, None)
        upstream.transport.write(data[:-2] + conn.suffix)
        conn.wait = RESPONSE  # (conn.arm() inlined)
        ctx.deadlines[conn] = now + pool.config.response_timeout

    async def _connect(self, first: Backend | None, avoid: frozenset[str] = frozenset()) -> None:
        ctx = self.ctx
        result = await connect_with_retries(ctx, self.key, lambda b: Upstream(ctx, b), first, avoid)
        self.task = None
        if self.conn.exchange is not self or self.conn.state is not CONNECTING:
            if isinstance(result, Connected):  # (the client went away meanwhile)
                result.transport.close()
            return
        if isinstance(result, Answer):
            self.conn.reject(result.status, result.detail)
            return
        self.send(result.backend, result.protocol)

    # -- forwarding ------------------------------------------------------------
    def send(self, backend: Backend, upstream: Upstream) -> None:
        conn = self.conn
        head = self.head
        self._attach(backend, upstream, len(conn.buf))
        out = self.request_bytes()
        if self.replaying:  # a resend on a fresh connection, the whole body held
            self._replay(upstream, out)
            return
        body = head.body
        self.held = bytearray() if self.reused and body.kind != "none" else None
        if body.kind == "length" and body.length:
            self.tracker = LengthTracker(body.length)
        elif body.kind == "chunked":
            self.tracker = ChunkedTracker()
        else:
            self.tracker = None
        if self.tracker is not None and conn.buf:
            pending = bytes(conn.buf)
            conn.buf.clear()
            upstream.transport.write(out)
            self.request_body(pending)
        else:
            upstream.transport.write(out)
        forwarding = conn.state is FORWARD
        if forwarding and conn.wait is None:
            conn.wait_for(self.tracker is not None)
        if not head.websocket and forwarding:
            conn.transport.resume_reading()

    def _attach(self, backend: Backend, upstream: Upstream, unsent: int) -> None:
        """The request's book-keeping once it has a backend connection (every path)."""
        ctx = self.ctx
        conn = self.conn
        head = self.head
        self.backend = conn.last_backend = backend
        self.upstream = upstream
        conn.advance(FORWARD)
        if not head.websocket:  # a websocket is attached as its tunnel, after the 101
            ctx.pool.attach(backend, conn, self.key)
        ctx.stats.requests[(ctx.pool.name, backend.id)] += 1
        self.mark_in = conn.nbytes_in - unsent
        self.mark_out = conn.nbytes_out
        upstream.expect(self, head.method, head.websocket, self.set_cookie)

    def _replay(self, upstream: Upstream, out: bytes) -> None:
        held = self.held
        assert held is not None
        self.held = None
        self.replaying = False
        self.tracker = None
        upstream.transport.write(out + held)
        self.conn.wait_for(False)
        self.conn.transport.resume_reading()

    def request_bytes(self) -> bytes:
        """The request's head as the backend gets it (X-Forwarded-* added)."""
        quick = self.quick
        if quick is not None:
            return quick[:-2] + self.conn.suffix
        return upstream_request(self.ctx, self.conn.ip, self.head)

    def request_body(self, data: bytes) -> None:
        tracker = self.tracker
        upstream = self.upstream
        assert tracker is not None and upstream is not None
        try:
            end = tracker.feed(data)
        except HttpError as exc:
            self.conn.reject(exc.status, exc.reason)
            return
        body = data if end < 0 or end == len(data) else data[:end]
        held = self.held
        if held is not None:  # (only on a reused connection, and only up to REPLAY_LIMIT)
            if len(held) + len(body) > REPLAY_LIMIT:
                self.held = None
            else:
                held += body
        upstream.transport.write(body)
        if end < 0:
            return
        self.tracker = None
        if end < len(data):
            self.conn.buf += data[end:]
        if self.conn.wait is BODY and upstream.awaiting_head():
            self.conn.wait_for(False)  # the body is complete: now the response deadline

    # -- the response (types.ClientSide: the Upstream calls these) --------------
    def will_close(self) -> bool:
        """Whether the client connection closes after the current response."""
        return self.conn.closing or not self.head.keep_alive

    def response_done(self, close_client: bool) -> None:
        """The backend finished its response."""
        unfinished_body = self.tracker is not None  # answered before the body was sent
        self.end()
        self.conn.request_done(close_client or unfinished_body or not self.head.keep_alive)

    def start_tunnel(self, upstream: Upstream, to_client: bytes, head_len: int) -> None:
        """The backend answered 101: hand both transports to a websocket tunnel."""
        ctx = self.ctx
        conn = self.conn
        backend = self.backend
        assert backend is not None
        conn.handed_over()
        self.backend = None
        self.upstream = None
        link = WsLink(ctx, backend, upstream.transport, conn.transport, conn.ip, conn.started)
        link.client.nbytes = conn.nbytes_in - len(conn.buf)  # (start() adds the buffered bytes)
        link.start(to_client, bytes(conn.buf), head_len, self.key)
        conn.buf = bytearray()

    def end(self) -> None:
        """The request's byte counts into the stats; it no longer holds a backend."""
        ctx = self.ctx
        backend = self.backend
        conn = self.conn
        if backend is not None:
            pool = ctx.pool
            pool.detach(backend, conn)
            bytes_ = ctx.stats.bytes  # (_count_bytes inlined: once per request)
            bytes_[(pool.name, backend.id, "in")] += conn.nbytes_in - self.mark_in
            bytes_[(pool.name, backend.id, "out")] += conn.nbytes_out - self.mark_out
        if self.status:
            conn.status = self.status
        self.backend = None
        self.upstream = None
        self.tracker = None

    def flush_bytes(self) -> None:
        """Count the request's bytes so far (a long response, SSE) in the stats."""
        backend = self.backend
        if backend is not None:
            self._count_bytes(backend)
            self.mark_in = self.conn.nbytes_in
            self.mark_out = self.conn.nbytes_out

    def _count_bytes(self, backend: Backend) -> None:
        bytes_ = self.ctx.stats.bytes
        pool = self.ctx.pool.name
        bytes_[(pool, backend.id, "in")] += self.conn.nbytes_in - self.mark_in
        bytes_[(pool, backend.id, "out")] += self.conn.nbytes_out - self.mark_out

    def drop_upstream(self) -> None:
        """Close the request's backend connection (it will not be answered)."""
        upstream = self.upstream
        if upstream is not None:
            upstream.client = None
            upstream.transport.close()
        self.end()

    def abandon(self, lost: bool, drop_upstream: bool) -> None:
        """The client connection ends mid-request (``lost``: closed; else an error answer)."""
        if lost and self.task is not None and not self.task.done():
            self.task.cancel()
        if self.native is not None:
            self.native.close()
        if drop_upstream and self.upstream is not None:
            self.drop_upstream()

    def _retry(self, first: Backend | None, avoid: frozenset[str], replay: bool = False) -> None:
        """Send the request again on a new connection (``replay``: the body held too)."""
        self.replaying = replay
        if self.quick is not None:  # the fast lane kept only the bytes: parse them now
            parsed = parse_request_head(self.quick)
            assert parsed is not None
            self.head = parsed[0]
            self.quick = None
        self.reused = False
        self.conn.connecting()
        splicer = self.ctx.splicer
        websocket = self.head.websocket and self.head.body.kind == "none"
        if websocket and splicer is not None:
            native = self.native
            if native is None:
                native = self.native = NativeUpgrade(self, self.conn, self.ctx, splicer)
            if native.attempt(first):
                return
        self.task = self.ctx.loop.create_task(self._connect(first, avoid))

    # -- failures: exchange_failures.py (upstream_failed, response_timeout, count_failure)
    # -- the native upgrade path (types.UpgradeClient) ----------------------------
    def begin_python_connect(self, backend: Backend) -> None:
        """Continue the attempts on the Python path, starting with ``backend``."""
        self.task = self.ctx.loop.create_task(self._connect(backend, self.tried))

    def count_failure(self, backend: Backend, failure: Failure, answered: bool) -> None:
        """Count a failed attempt (stats, passive health); a blamed backend is not retried."""
        if account(self.ctx, backend, failure, answered):
            self.tried = self.tried | {backend.id}

    def run(self, step: Coroutine[Any, Any, None] | None) -> None:
        """Run ``step`` as the request's pending task (None: the task is over)."""
        self.task = None if step is None else self.ctx.loop.create_task(step)

    def adopted(self, backend: Backend, upstream: asyncio.Protocol, data: bytes) -> None:
        """A backend connection the engine made is now ``upstream``'s; ``data`` read so far."""
        assert isinstance(upstream, Upstream)
        if self.conn.exchange is not self or self.conn.state is not CONNECTING:
            upstream.transport.close()  # (the client went away meanwhile)
            return
        self.tracker = None
        self._attach(backend, upstream, len(self.conn.buf))
        upstream.data_received(data)

    def tunnel_started(self, backend: Backend) -> None:
        """The engine spliced this client's websocket: the connection is done."""
        self.conn.handed_over()
        self.conn.last_backend = backend
        self.ctx.stats.requests[(self.ctx.pool.name, backend.id)] += 1
        self.native = None
