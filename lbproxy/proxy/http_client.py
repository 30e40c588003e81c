"""http mode (L7), client side: read a request head, route it, forward, loop (keep-alive).

States: HEAD (reading a request head) -> CONNECTING (picking/connecting a backend)
-> FORWARD (request body streaming and/or waiting for the response) -> HEAD again,
or -> DONE (tunnelled after a 101, or closed). A websocket upgrade hands both
transports to a WsLink (tunnel.py) once the backend answered 101.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING, cast

from lbproxy.balance import extract_key
from lbproxy.errors import HttpError
from lbproxy.http1 import (
    MAX_HEAD,
    BodyFraming,
    ChunkedTracker,
    LengthTracker,
    RequestHead,
    error_response,
    parse_request_head,
    rewrite_request,
)
from lbproxy.http1.lanes import quick_request, quick_websocket
from lbproxy.pool import Backend, BackendState
from lbproxy.proxy.accesslog import log_connection
from lbproxy.proxy.connect import Connected, account, connect_with_retries
from lbproxy.proxy.context import ListenerContext
from lbproxy.proxy.deadlines import Wait, body_stalled, next_body_check, untried
from lbproxy.proxy.http_upstream import Upstream
from lbproxy.proxy.native_upgrade import NativeUpgrade
from lbproxy.proxy.retry import Answer, Facts, Failure, Retry, decide
from lbproxy.proxy.states import CLIENT_TRANSITIONS, ClientState, check
from lbproxy.proxy.tunnel import Linger, WsLink

if TYPE_CHECKING:
    from lbproxy.proxy.types import SplicerLike

HEAD, CONNECTING, FORWARD, DONE = ClientState

# What a request taken by the fast lane amounts to (see http1.lanes.quick_request).
QUICK_LIMIT = 8192  # larger heads take the full path (and its limits)
QUICK_GET = RequestHead(b"GET", b"/", b"1.1", (), (), True, False, BodyFraming("none"))
QUICK_WEBSOCKET = RequestHead(b"GET", b"/", b"1.1", (), (), True, True, BodyFraming("none"))
UP = BackendState.UP
REPLAY_LIMIT = 65536  # request body bytes held for a resend while on a reused connection


class HttpClient(asyncio.Protocol):
    """One client connection of an http listener (until it becomes a websocket tunnel)."""

    __slots__ = (
        "backend",
        "buf",
        "closing",
        "ctx",
        "head",
        "held",
        "ip",
        "key",
        "last_backend",
        "logged",
        "mark_in",
        "mark_out",
        "native",
        "nbytes_in",
        "nbytes_out",
        "port",
        "quick",
        "replaying",
        "requests",
        "reused",
        "set_cookie",
        "started",
        "state",
        "status",
        "suffix",
        "task",
        "timer",
        "tracker",
        "transport",
        "tried",
        "upstream",
        "wait",
        "wait_mark",
        "wait_since",
    )

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = bytearray()
        self.state: ClientState = HEAD
        self.ip = ""
        self.port = 0
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.head: RequestHead | None = None
        self.key: bytes | None = None
        self.set_cookie: tuple[bytes, bytes] | None = None
        self.backend: Backend | None = None
        self.last_backend: Backend | None = None
        self.logged = False
        self.upstream: Upstream | None = None
        self.tracker: ChunkedTracker | LengthTracker | None = None
        self.tried: frozenset[str] = frozenset()  # backends that failed this request
        self.closing = False
        self.reused = False
        self.started = 0.0
        self.requests = 0
        self.status = 0
        self.quick: bytes | None = None
        self.suffix = b""
        self.nbytes_in = self.nbytes_out = self.mark_in = self.mark_out = 0
        # a websocket upgrade connected by the native engine (native_upgrade.py)
        self.native: NativeUpgrade | None = None
        # the deadline this connection waits on (in ctx.deadlines; the listener's sweep checks)
        self.wait: Wait | None = None
        self.wait_mark = 0  # (a streaming body: nbytes_in when last looked at, and since when)
        self.wait_since = 0.0
        self.held: bytearray | None = None  # the request body so far, while it can be resent
        self.replaying = False

    def _to(self, new: ClientState) -> None:
        """The one place the connection changes state (states.CLIENT_TRANSITIONS)."""
        if new not in CLIENT_TRANSITIONS[self.state]:
            check(CLIENT_TRANSITIONS, self.state, new)  # (raises IllegalTransition)
        self.state = new

    # -- asyncio callbacks ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        self.transport = transport
        self.started = time.monotonic()
        ctx.stats.connections_total[ctx.config.name] += 1
        peer = transport.get_extra_info("peername")
        if peer:
            self.ip, self.port = peer[0], peer[1]
        if len(ctx.connections) >= ctx.config.max_connections:
            self.reject(503, "too many connections")
            return
        ctx.connections.add(self)
        self.timer = ctx.loop.call_later(ctx.config.handshake_timeout, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        self.nbytes_in += len(data)
        state = self.state
        if state is HEAD:
            if not self.buf and len(data) <= QUICK_LIMIT:
                if quick_request(data):
                    if self._quick(data):
                        return
                elif quick_websocket(data) and self._quick_websocket(data):
                    return
            self.buf += data
            self._try_head()
        elif state is FORWARD and self.tracker is not None:
            self._request_body(data)
        elif state is not DONE:
            self.buf += data  # pipelined request or websocket bytes before the 101
            if len(self.buf) > MAX_HEAD:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.state is HEAD:
            if self.buf:  # half a request head, and the client will send no more
                self.reject(400, "connection closed in the middle of the request head")
            return False  # (an idle keep-alive connection closed by the client: just close)
        self.closing = True  # answer what is in flight, then close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        ctx = self.ctx
        prev = self.state
        self._to(DONE)
        ctx.connections.discard(self)
        self._disarm()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._drop_native()
        upstream = self.upstream
        if upstream is not None and prev is not DONE:
            upstream.client = None
            upstream.transport.close()
            self._end_request()
        if self.requests:
            self._log(f"client closed after {self.requests} request(s)")

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # -- request head --------------------------------------------------------
    def _head_timeout(self) -> None:
        self.timer = None
        if self.state is HEAD:
            self.reject(408, "request head not received in time")

    def _try_head(self) -> None:
        try:
            parsed = parse_request_head(self.buf)
        except HttpError as exc:
            self.reject(exc.status, exc.reason)
            return
        if parsed is None:
            self._disarm()  # (a keep-alive wait ends: the handshake timeout applies)
            if self.timer is None:
                self.timer = self.ctx.loop.call_later(
                    self.ctx.config.handshake_timeout, self._head_timeout
                )
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        head, used = parsed
        del self.buf[:used]
        self._dispatch(head)

    def _quick(self, data: bytes) -> bool:
        """Fast lane: a plain GET on a warm keep-alive upstream connection (False: full path)."""
        ctx = self.ctx
        pool = ctx.pool
        lane, key = self._lane_key()
        if not lane:
            return False
        backend = pool.pick(key)
        if backend is None:
            return False
        now = time.monotonic()
        transport = ctx.idle.take(backend, now, pool.config.upstream_keepalive_timeout)
        if transport is None:  # no warm connection: the full path, to the backend just picked
            try:
                parsed = parse_request_head(data)
            except HttpError:
                return False
            if parsed is None or parsed[1] != len(data):
                return False
            self._dispatch(parsed[0], backend)
            return True
        upstream = cast(Upstream, transport.get_protocol())
        self._begin(QUICK_GET, data, key)
        self.reused = True
        self.tracker = None
        self._attach(backend, upstream, QUICK_GET, len(data))
        upstream.transport.write(data[:-2] + self._suffix())
        self._arm(Wait.RESPONSE, now + pool.config.response_timeout)
        return True

    def _lane_key(self) -> tuple[bool, bytes | None]:
        """(whether the fast lanes may route this pool, the affinity key they use)."""
        ctx = self.ctx
        if ctx.pool.config.balance != "hash":
            return True, None
        if ctx.key_spec().kind != "ip":
            return False, None  # cookie/header/query keys need the parsed headers
        return True, self.ip.encode()

    def _begin(self, head: RequestHead, quick: bytes | None, key: bytes | None) -> None:
        """Book-keeping shared by every new request."""
        self.wait = None  # (the keep-alive entry stays in ctx.deadlines until overwritten)
        self.held = None
        self.replaying = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.requests += 1
        self.tried = frozenset()
        self.head = head
        self.quick = quick
        self.key = key
        self.set_cookie = None

    def _suffix(self) -> bytes:
        """The X-Forwarded-* lines (and the final CRLF) fast-lane requests get."""
        suffix = self.suffix
        if not suffix:
            ctx = self.ctx
            suffix = self.suffix = (
                f"X-Forwarded-For: {self.ip}\r\nX-Forwarded-Proto: {ctx.proto.decode()}\r\n"
                f"X-Forwarded-Port: {ctx.port}\r\n\r\n"
            ).encode()
        return suffix

    def _quick_websocket(self, data: bytes) -> bool:
        """Fast lane for a plain websocket upgrade: route and forward it without re-parsing."""
        ctx = self.ctx
        lane, key = self._lane_key()
        if not lane:
            return False
        self._begin(QUICK_WEBSOCKET, data, key)
        self.reused = False
        self._to(CONNECTING)
        self.transport.pause_reading()
        splicer = ctx.splicer
        if splicer is None or not self._start_native(splicer, None):
            self.task = ctx.loop.create_task(self._connect(None))
        return True

    def _dispatch(self, head: RequestHead, picked: Backend | None = None) -> None:
        ctx = self.ctx
        pool = ctx.pool
        self._begin(head, None, None)
        self._to(CONNECTING)
        self.key = self._affinity_key(head)
        self.transport.pause_reading()
        first = None
        if not head.websocket:
            first = picked or pool.pick(self.key)
            if first is None:
                self.reject(503, "no healthy backend")
                return
            idle = ctx.idle.take(first, time.monotonic(), pool.config.upstream_keepalive_timeout)
            if idle is not None:
                upstream = idle.get_protocol()
                assert isinstance(upstream, Upstream)
                self.reused = True
                self._send(first, upstream)
                return
        self.reused = False
        splicer = ctx.splicer
        if head.websocket and splicer is not None and self._start_native(splicer, first):
            return
        self.task = ctx.loop.create_task(self._connect(first))

    def _affinity_key(self, head: RequestHead) -> bytes | None:
        ctx = self.ctx
        config = ctx.pool.config
        self.set_cookie = None
        if config.balance != "hash":
            return None
        spec = ctx.key_spec()
        key = extract_key(spec, self.ip, head.headers, head.target)
        if spec.kind == "cookie" and config.sticky_cookie:
            value = ctx.pool.sticky_cookie(key)  # (signed: names the backend it picks now)
            if value is not None:
                self.set_cookie = (
                    b"Set-Cookie",
                    f"{spec.name}={value}; Path=/; HttpOnly; SameSite=Lax".encode(),
                )
                key = value.encode()
        return key if key is not None else self.ip.encode()

    async def _connect(self, first: Backend | None, avoid: frozenset[str] = frozenset()) -> None:
        ctx = self.ctx
        result = await connect_with_retries(ctx, self.key, lambda b: Upstream(ctx, b), first, avoid)
        self.task = None
        if self.state is not CONNECTING:  # client went away meanwhile
            if isinstance(result, Connected):
                result.transport.close()
            return
        if isinstance(result, Answer):
            self.reject(result.status, result.detail)
            return
        self._send(result.backend, result.protocol)

    # -- forwarding ----------------------------------------------------------
    def _send(self, backend: Backend, upstream: Upstream) -> None:
        head = self.head
        assert head is not None
        self._attach(backend, upstream, head, len(self.buf))
        out = self.request_bytes()
        if self.replaying:  # a resend on a fresh connection, the whole body held
            self._replay(upstream, out)
            return
        self.held = bytearray() if self.reused and head.body.kind != "none" else None
        body = head.body
        if body.kind == "length" and body.length:
            self.tracker = LengthTracker(body.length)
        elif body.kind == "chunked":
            self.tracker = ChunkedTracker()
        else:
            self.tracker = None
        if self.tracker is not None and self.buf:
            pending = bytes(self.buf)
            self.buf.clear()
            upstream.transport.write(out)
            self._request_body(pending)
        else:
            upstream.transport.write(out)
        if self.state is FORWARD and self.wait is None:
            self._arm_wait()
        if not head.websocket and self.state is FORWARD:
            self.transport.resume_reading()

    def _attach(self, backend: Backend, upstream: Upstream, head: RequestHead, unsent: int) -> None:
        """The request's book-keeping once it has a backend connection (every path)."""
        ctx = self.ctx
        self.backend = self.last_backend = backend
        self.upstream = upstream
        self._to(FORWARD)
        if not head.websocket:  # a websocket is attached as its tunnel, after the 101
            ctx.pool.attach(backend, self, self.key)
        ctx.stats.requests[(ctx.pool.name, backend.id)] += 1
        self.mark_in = self.nbytes_in - unsent
        self.mark_out = self.nbytes_out
        upstream.expect(self, head.method, head.websocket, self.set_cookie)

    def _replay(self, upstream: Upstream, out: bytes) -> None:
        held = self.held
        assert held is not None
        self.held = None
        self.replaying = False
        self.tracker = None
        upstream.transport.write(out + held)
        self._arm_wait()
        self.transport.resume_reading()

    # -- deadlines (checked by the listener's sweep: no timer per connection) ---
    def _arm(self, wait: Wait, when: float) -> None:
        self.wait = wait
        self.ctx.deadlines[self] = when

    def _disarm(self) -> None:
        self.wait = None
        self.ctx.deadlines.pop(self, None)

    def _arm_wait(self) -> None:
        """The request went out (or part of it): wait for the rest of its body or the answer."""
        now = time.monotonic()
        if self.tracker is not None:
            self.wait_mark = self.nbytes_in
            self.wait_since = now
            timeout = self.ctx.config.body_timeout
            self._arm(Wait.BODY, next_body_check(now, now, timeout))
        else:
            self._arm(Wait.RESPONSE, now + self.ctx.pool.config.response_timeout)

    def response_started(self) -> None:
        """The backend's final response head (or 101) arrived: no response deadline now.
        (Its entry stays in ctx.deadlines: the keep-alive one overwrites it, or the sweep
        drops it; a set and a pop per request saved on the hot path.)"""
        if self.wait is Wait.RESPONSE:
            self.wait = None

    def deadline_passed(self, now: float) -> None:
        wait = self.wait
        self._disarm()  # (wait None: an entry left behind, nothing to do)
        if wait is Wait.KEEPALIVE:
            if self.state is HEAD and not self.buf:
                self._to(DONE)
                self._log(f"idle for {self.ctx.config.keepalive_timeout:g}s between requests")
                self.transport.close()
        elif wait is Wait.BODY:
            if self.state is not FORWARD or self.tracker is None:
                return
            timeout = self.ctx.config.body_timeout
            if self.nbytes_in != self.wait_mark:
                self.wait_mark, self.wait_since = self.nbytes_in, now
            elif body_stalled(now, self.wait_since, timeout):
                if self.nbytes_out > self.mark_out:  # (the backend has begun its answer)
                    self._drop_upstream()
                    self.close_now()
                else:
                    self.reject(408, "request body not received in time")
                return
            self._arm(Wait.BODY, next_body_check(now, self.wait_since, timeout))
        elif wait is Wait.RESPONSE:
            native = self.native
            if native is not None and native.pending:
                native.response_timeout()
            elif self.state is FORWARD:
                self._response_timeout()

    def _drop_upstream(self) -> None:
        """Close the current request's backend connection (it will not be answered)."""
        upstream = self.upstream
        if upstream is not None:
            upstream.client = None
            upstream.transport.close()
        self._end_request()

    def _response_timeout(self) -> None:
        backend, head = self.backend, self.head
        if backend is None or self.upstream is None or head is None:
            return
        self._upstream_failure(backend, Failure.RESPONSE_TIMEOUT, self.nbytes_out > self.mark_out)

    def request_bytes(self) -> bytes:
        """The current request's head as the backend gets it (X-Forwarded-* added)."""
        head = self.head
        assert head is not None
        quick = self.quick
        if quick is not None:
            return quick[:-2] + self._suffix()
        ctx = self.ctx
        http10 = head.version == b"1.0"
        out = rewrite_request(
            head,
            client_ip=self.ip,
            proto=ctx.proto,
            port=ctx.port,
            keep_xff=ctx.is_trusted(self.ip),
            upstream_keep_alive=not http10,
        )
        if http10:
            # An HTTP/1.0 client cannot read a chunked response: ask the backend in 1.0
            # too (it then answers with Content-Length or until close).
            out = out.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
        return out

    # -- the native upgrade path (native_upgrade.py, types.UpgradeClient) ---------
    def _native(self, splicer: SplicerLike) -> NativeUpgrade:
        native = self.native
        if native is None:
            native = self.native = NativeUpgrade(self, self.ctx, splicer)
        return native

    def _start_native(self, splicer: SplicerLike, first: Backend | None) -> bool:
        """Route and connect the websocket upgrade natively; False: use the Python path."""
        head = self.head
        if head is None or head.body.kind != "none":
            return False
        return self._native(splicer).attempt(first)

    def state_is_connecting(self) -> bool:
        return self.state is CONNECTING

    def begin_python_connect(self, backend: Backend) -> None:
        """Continue the attempts on the Python path, starting with ``backend``."""
        self.task = self.ctx.loop.create_task(self._connect(backend, self.tried))

    def adopt(self, backend: Backend, sock: socket.socket, data: bytes) -> None:
        """Carry on with a backend connection the engine made, ``data`` read from it."""
        self.task = self.ctx.loop.create_task(self._adopt(backend, sock, data))

    async def _adopt(self, backend: Backend, sock: socket.socket, data: bytes) -> None:
        ctx = self.ctx
        try:
            transport, upstream = await ctx.loop.create_connection(
                lambda: Upstream(ctx, backend), sock=sock
            )
        except OSError:
            self.task = None
            sock.close()
            self.reject(502, "backend connection lost")
            return
        self.task = None
        if self.state is CONNECTING:
            self.adopted(backend, upstream)
            upstream.data_received(data)
        else:
            transport.close()

    def buffered(self) -> bytes:
        """What the client sent beyond the current request head (for the tunnel)."""
        return bytes(self.buf)

    def count_failure(self, backend: Backend, failure: Failure, answered: bool) -> None:
        """Count a failed attempt (stats, passive health); a blamed backend is not retried."""
        if account(self.ctx, backend, failure, answered):
            self.tried = self.tried | {backend.id}

    def arm_response_deadline(self) -> None:
        """The engine sent the upgrade request: the response deadline starts now."""
        self._arm(Wait.RESPONSE, time.monotonic() + self.ctx.pool.config.response_timeout)

    def adopted(self, backend: Backend, upstream: Upstream) -> None:
        """A backend connection the engine made now belongs to ``upstream`` (request sent)."""
        head = self.head
        assert head is not None
        self.tracker = None
        self._attach(backend, upstream, head, len(self.buf))

    def tunnel_started(self, backend: Backend) -> None:
        """The engine spliced this client's websocket: this protocol is done."""
        ctx = self.ctx
        self._to(DONE)
        self._disarm()
        self.last_backend = backend
        ctx.connections.discard(self)
        ctx.stats.requests[(ctx.pool.name, backend.id)] += 1
        ctx.stats.handshake_seconds.observe(time.monotonic() - self.started)
        self.native = None

    def close_now(self) -> None:
        """The backend went away in the middle of its answer: close the client."""
        self._to(DONE)
        self._disarm()
        self.transport.close()

    def _drop_native(self) -> None:
        """Close a native backend connection still being set up (client gone or rejected)."""
        native = self.native
        if native is not None:
            native.close()

    def _request_body(self, data: bytes) -> None:
        tracker = self.tracker
        upstream = self.upstream
        assert tracker is not None and upstream is not None
        try:
            end = tracker.feed(data)
        except HttpError as exc:
            self.reject(exc.status, exc.reason)
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
            self.buf += data[end:]
        if self.wait is Wait.BODY and upstream.awaiting_head():
            self._arm_wait()  # the body is complete: now the response deadline

    def will_close(self) -> bool:
        """Whether the client connection closes after the current response."""
        head = self.head
        return self.closing or head is None or not head.keep_alive

    def response_done(self, close_client: bool) -> None:
        """The backend finished its response (called by Upstream)."""
        unfinished_body = self.tracker is not None  # answered before the body was sent
        self._end_request()
        head = self.head
        self.head = None
        if close_client or unfinished_body or self.closing or head is None or not head.keep_alive:
            self._close_after_response()
            return
        self._to(HEAD)
        if self.buf:
            self._try_head()
        else:
            self._arm(Wait.KEEPALIVE, time.monotonic() + self.ctx.config.keepalive_timeout)
            self.transport.resume_reading()

    def _end_request(self) -> None:
        ctx = self.ctx
        backend = self.backend
        if backend is not None:
            ctx.pool.detach(backend, self)
            stats = ctx.stats
            stats.bytes[(ctx.pool.name, backend.id, "in")] += self.nbytes_in - self.mark_in
            stats.bytes[(ctx.pool.name, backend.id, "out")] += self.nbytes_out - self.mark_out
        self.backend = None
        self.upstream = None
        self.tracker = None

    def upstream_failed(self, got_response: bool, failure: Failure) -> None:
        """The backend connection died before the response completed."""
        backend = self.backend
        if backend is None or self.head is None:
            self._end_request()
            if got_response:
                self.close_now()
            else:
                self.reject(502, "backend closed the connection")
            return
        if not got_response and self.reused:
            # A kept-alive connection closed under us before any answer: not the backend's
            # failure. Resend once on a fresh connection when the whole request is at hand.
            failure = Failure.REUSED_CONNECTION_CLOSED
        self._upstream_failure(backend, failure, got_response)

    def _upstream_failure(self, backend: Backend, failure: Failure, answered: bool) -> None:
        """Account for ``failure`` of the current request's backend, then act (retry.decide)."""
        ctx = self.ctx
        head = self.head
        assert head is not None
        if account(ctx, backend, failure, answered):
            self.tried = self.tried | {backend.id}
        pool = ctx.pool
        has_body = head.body.kind != "none"
        others = True
        if failure is Failure.RESPONSE_TIMEOUT:
            states = ((b.id, b.state is UP) for b in pool.backends.values())
            others = untried(states, self.tried)
        facts = Facts(
            answered=answered,
            reused=self.reused,
            has_body=has_body,
            replayable=has_body and self.tracker is None and self.held is not None,
            tried=len(self.tried),
            retries=pool.config.retries,
            others=others,
        )
        action = decide(failure, facts)
        if failure is Failure.RESPONSE_TIMEOUT:
            self._drop_upstream()
        else:
            self._end_request()
        if isinstance(action, Retry):
            if action.same:
                self._retry(backend, frozenset(), action.replay)
            else:
                self._retry(None, self.tried)
        elif isinstance(action, Answer):
            self.reject(action.status, action.detail)
        else:
            self.close_now()

    def _retry(self, first: Backend | None, avoid: frozenset[str], replay: bool = False) -> None:
        """Send the current request again on a new connection (to ``first``, or elsewhere);
        ``replay``: with the request body held in ``held``."""
        self._disarm()
        self.replaying = replay
        if self.quick is not None:  # the fast lane kept only the bytes: parse them now
            parsed = parse_request_head(self.quick)
            assert parsed is not None
            self.head = parsed[0]
            self.quick = None
        self._to(CONNECTING)
        self.reused = False
        self.transport.pause_reading()
        splicer = self.ctx.splicer
        head = self.head
        websocket = head is not None and head.websocket and head.body.kind == "none"
        if websocket and splicer is not None and self._native(splicer).attempt(first):
            return
        self.task = self.ctx.loop.create_task(self._connect(first, avoid))

    def start_tunnel(self, upstream: Upstream, to_client: bytes, head_len: int) -> None:
        """The backend answered 101: hand both transports to a websocket tunnel."""
        ctx = self.ctx
        backend = self.backend
        assert backend is not None
        self._to(DONE)
        self._disarm()
        ctx.connections.discard(self)
        ctx.stats.handshake_seconds.observe(time.monotonic() - self.started)
        self.backend = None
        self.upstream = None
        link = WsLink(ctx, backend, upstream.transport, self.transport, self.ip, self.started)
        link.client.nbytes = self.nbytes_in - len(self.buf)  # (start() adds the buffered bytes)
        link.start(to_client, bytes(self.buf), head_len, self.key)
        self.buf = bytearray()

    def write(self, data: bytes) -> None:
        self.nbytes_out += len(data)
        self.transport.write(data)

    # -- errors and lifecycle -------------------------------------------------
    def _log(self, reason: str) -> None:
        """The connection's access-log line (once)."""
        ctx = self.ctx
        if ctx.access_log and not self.logged:
            self.logged = True
            log_connection(
                ctx,
                self.ip,
                self.last_backend,
                time.monotonic() - self.started,
                self.nbytes_in,
                self.nbytes_out,
                reason,
                self.status,
            )

    def _close_after_response(self) -> None:
        """Close once the response is out: FIN, then drop what the client still sends."""
        self._to(DONE)
        self._disarm()
        self.ctx.connections.discard(self)
        self._log(f"closed after {self.requests} request(s)")
        Linger.close(self.transport, self.ctx.loop)

    def reject(self, status: int, detail: str) -> None:
        ctx = self.ctx
        ctx.stats.rejected[(ctx.config.name, str(status))] += 1
        self.status = status
        self._disarm()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._drop_native()
        self._log(f"rejected: {detail}")
        upstream = self.upstream
        if upstream is not None:
            upstream.client = None
            upstream.transport.close()
            self._end_request()
        self._to(DONE)
        if not self.transport.is_closing():
            self.write(error_response(status, detail=detail))
            self.ctx.connections.discard(self)
            Linger.close(self.transport, self.ctx.loop)

    def activity(self) -> int:
        return self.nbytes_in + self.nbytes_out

    def flush_bytes(self) -> None:
        """Count the current request's bytes so far (a long response, SSE) in the stats."""
        backend = self.backend
        if backend is None:
            return
        stats = self.ctx.stats
        pool = self.ctx.pool.name
        stats.bytes[(pool, backend.id, "in")] += self.nbytes_in - self.mark_in
        stats.bytes[(pool, backend.id, "out")] += self.nbytes_out - self.mark_out
        self.mark_in = self.nbytes_in
        self.mark_out = self.nbytes_out

    def go_away(self) -> None:
        if self.state is HEAD and not self.buf:
            self._to(DONE)
            self.transport.close()
        else:
            self.closing = True

    def abort(self, reason: str) -> None:
        if self.state is HEAD and self.buf:
            self.reject(408, reason)
            return
        self._to(DONE)
        self.transport.close()
