"""http mode (L7), client side: read a request head, route it, forward, loop (keep-alive).

States: HEAD (reading a request head) -> CONNECTING (picking/connecting a backend)
-> FORWARD (request body streaming and/or waiting for the response) -> HEAD again,
or -> DONE (tunnelled after a 101, or closed). A websocket upgrade hands both
transports to a WsLink (tunnel.py) once the backend answered 101.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

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
from lbproxy.pool import Backend
from lbproxy.proxy import native_upgrade
from lbproxy.proxy.accesslog import log_connection
from lbproxy.proxy.connect import connect_with_retries
from lbproxy.proxy.context import ListenerContext
from lbproxy.proxy.http_upstream import Upstream
from lbproxy.proxy.tunnel import Linger, WsLink

HEAD, CONNECTING, FORWARD, DONE = range(4)

# What a request taken by the fast lane amounts to (see http1.lanes.quick_request).
QUICK_LIMIT = 8192  # larger heads take the full path (and its limits)
QUICK_GET = RequestHead(b"GET", b"/", b"1.1", (), (), True, False, BodyFraming("none"))
QUICK_WEBSOCKET = RequestHead(b"GET", b"/", b"1.1", (), (), True, True, BodyFraming("none"))


class HttpClient(asyncio.Protocol):
    """One client connection of an http listener (until it becomes a websocket tunnel)."""

    __slots__ = (
        "backend",
        "buf",
        "closing",
        "ctx",
        "head",
        "ip",
        "key",
        "last_backend",
        "logged",
        "mark_in",
        "mark_out",
        "nbackend",
        "nbytes_in",
        "nbytes_out",
        "nresp",
        "nslot",
        "port",
        "quick",
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
    )

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = bytearray()
        self.state = HEAD
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
        self.nslot = -1
        self.nbackend: Backend | None = None
        self.nresp = bytearray()

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
            self._reject(503, "too many connections")
            return
        ctx.connections.add(self)
        self.timer = ctx.loop.call_later(ctx.config.handshake_timeout, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        self.nbytes_in += len(data)
        state = self.state
        if state == HEAD:
            if not self.buf and len(data) <= QUICK_LIMIT:
                if quick_request(data):
                    if self._quick(data):
                        return
                elif quick_websocket(data) and self._quick_websocket(data):
                    return
            self.buf += data
            self._try_head()
        elif state == FORWARD and self.tracker is not None:
            self._request_body(data)
        elif state != DONE:
            self.buf += data  # pipelined request or websocket bytes before the 101
            if len(self.buf) > MAX_HEAD:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.state == HEAD:
            if self.buf:  # half a request head, and the client will send no more
                self._reject(400, "connection closed in the middle of the request head")
            return False  # (an idle keep-alive connection closed by the client: just close)
        self.closing = True  # answer what is in flight, then close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        ctx = self.ctx
        prev = self.state
        self.state = DONE
        ctx.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._drop_native()
        upstream = self.upstream
        if upstream is not None and prev != DONE:
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
        if self.state == HEAD:
            self._reject(408, "request head not received in time")

    def _try_head(self) -> None:
        try:
            parsed = parse_request_head(self.buf)
        except HttpError as exc:
            self._reject(exc.status, exc.reason)
            return
        if parsed is None:
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
        transport = ctx.idle.take(backend)
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
        self.backend = self.last_backend = backend
        self.upstream = upstream
        self.state = FORWARD
        self.tracker = None
        pool.attach(backend, self, key)
        ctx.stats.requests[(pool.name, backend.id)] += 1
        self.mark_in = self.nbytes_in - len(data)
        self.mark_out = self.nbytes_out
        upstream.expect(self, b"GET", False, None)
        upstream.transport.write(data[:-2] + self._suffix())
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
        self.state = CONNECTING
        self.transport.pause_reading()
        splicer = ctx.splicer
        if splicer is None or not native_upgrade.start(self, splicer, None):
            self.task = ctx.loop.create_task(self._connect(None))
        return True

    def _dispatch(self, head: RequestHead, picked: Backend | None = None) -> None:
        ctx = self.ctx
        pool = ctx.pool
        self._begin(head, None, None)
        self.state = CONNECTING
        self.key = self._affinity_key(head)
        self.transport.pause_reading()
        first = None
        if not head.websocket:
            first = picked or pool.pick(self.key)
            if first is None:
                self._reject(503, "no healthy backend")
                return
            idle = ctx.idle.take(first)
            if idle is not None:
                upstream = idle.get_protocol()
                assert isinstance(upstream, Upstream)
                self.reused = True
                self._send(first, upstream)
                return
        self.reused = False
        splicer = ctx.splicer
        if head.websocket and splicer is not None and native_upgrade.start(self, splicer, first):
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
        if self.state != CONNECTING:  # client went away meanwhile
            if not isinstance(result, int):
                result[1].close()
            return
        if isinstance(result, int):
            self._reject(result, "no healthy backend" if result == 503 else "backend unreachable")
            return
        backend, _transport, upstream = result
        self._send(backend, upstream)

    # -- forwarding ----------------------------------------------------------
    def _send(self, backend: Backend, upstream: Upstream) -> None:
        ctx = self.ctx
        head = self.head
        assert head is not None
        self.backend = self.last_backend = backend
        self.upstream = upstream
        self.state = FORWARD
        if not head.websocket:  # a websocket is attached as its tunnel, after the 101
            ctx.pool.attach(backend, self, self.key)
        ctx.stats.requests[(ctx.pool.name, backend.id)] += 1
        self.mark_in = self.nbytes_in - len(self.buf)
        self.mark_out = self.nbytes_out
        out = self.request_bytes()
        upstream.expect(self, head.method, head.websocket, self.set_cookie)
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
        if not head.websocket and self.state == FORWARD:
            self.transport.resume_reading()

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

    # -- the native upgrade path (native_upgrade.py) calls these ---------------
    def state_is_connecting(self) -> bool:
        return self.state == CONNECTING

    def begin_python_connect(self, backend: Backend) -> None:
        """Continue the attempts on the Python path, starting with ``backend``."""
        self.task = self.ctx.loop.create_task(self._connect(backend, self.tried))

    def adopted(self, backend: Backend, upstream: Upstream) -> None:
        """A backend connection the engine made now belongs to ``upstream`` (request sent)."""
        head = self.head
        assert head is not None
        ctx = self.ctx
        self.backend = self.last_backend = backend
        self.upstream = upstream
        self.state = FORWARD
        self.tracker = None
        ctx.stats.requests[(ctx.pool.name, backend.id)] += 1
        self.mark_in = self.nbytes_in - len(self.buf)
        self.mark_out = self.nbytes_out
        upstream.expect(self, head.method, head.websocket, self.set_cookie)

    def tunnel_started(self) -> None:
        """The engine spliced this client's websocket: this protocol is done."""
        ctx = self.ctx
        backend = self.nbackend
        assert backend is not None
        self.state = DONE
        self.last_backend = backend
        ctx.connections.discard(self)
        ctx.stats.requests[(ctx.pool.name, backend.id)] += 1
        ctx.stats.handshake_seconds.observe(time.monotonic() - self.started)
        self.nbackend = None

    def close_now(self) -> None:
        """The backend went away in the middle of its answer: close the client."""
        self.state = DONE
        self.transport.close()

    def _drop_native(self) -> None:
        """Close a native backend connection still being set up (client gone or rejected)."""
        if self.nslot >= 0:
            splicer = self.ctx.splicer
            if splicer is not None:
                splicer.engine.close(self.nslot, self)
            self.nslot = -1

    def _request_body(self, data: bytes) -> None:
        tracker = self.tracker
        upstream = self.upstream
        assert tracker is not None and upstream is not None
        try:
            end = tracker.feed(data)
        except HttpError as exc:
            self._reject(exc.status, exc.reason)
            return
        if end < 0:
            upstream.transport.write(data)
            return
        upstream.transport.write(data[:end] if end < len(data) else data)
        self.tracker = None
        if end < len(data):
            self.buf += data[end:]

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
        self.state = HEAD
        if self.buf:
            self._try_head()
        else:
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

    def upstream_failed(self, got_response: bool, reason: str) -> None:
        """The backend connection died before the response completed."""
        head = self.head
        backend = self.backend
        if (
            not got_response
            and self.reused
            and head is not None
            and head.body.kind == "none"
            and backend is not None
        ):
            # A kept-alive connection closed under us before any answer: retry once, fresh.
            self._end_request()
            self._retry(backend, frozenset())
            return
        ctx = self.ctx
        if backend is not None:
            ctx.stats.upstream_errors[(ctx.pool.name, backend.id, reason)] += 1
            if not got_response:
                # accepted, then closed or reset without a word: a passive failure, and (for
                # a request without a body, nothing having reached the client) another backend
                ctx.pool.connect_failed(backend, f"{reason} before answering")
                self.tried = self.tried | {backend.id}
                if (
                    head is not None
                    and head.body.kind == "none"
                    and len(self.tried) <= ctx.pool.config.retries
                ):
                    self._end_request()
                    self._retry(None, self.tried)
                    return
        self._end_request()
        if got_response:
            self.state = DONE
            self.transport.close()
        else:
            self._reject(502, "backend closed the connection")

    def _retry(self, first: Backend | None, avoid: frozenset[str]) -> None:
        """Send the current request again on a new connection (to ``first``, or elsewhere)."""
        if self.quick is not None:  # the fast lane kept only the bytes: parse them now
            parsed = parse_request_head(self.quick)
            assert parsed is not None
            self.head = parsed[0]
            self.quick = None
        self.state = CONNECTING
        self.reused = False
        self.transport.pause_reading()
        self.task = self.ctx.loop.create_task(self._connect(first, avoid))

    def start_tunnel(self, upstream: Upstream, to_client: bytes, head_len: int) -> None:
        """The backend answered 101: hand both transports to a websocket tunnel."""
        ctx = self.ctx
        backend = self.backend
        assert backend is not None
        self.state = DONE
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
        self.state = DONE
        self.ctx.connections.discard(self)
        self._log(f"closed after {self.requests} request(s)")
        Linger.close(self.transport, self.ctx.loop)

    def _reject(self, status: int, detail: str) -> None:
        ctx = self.ctx
        ctx.stats.rejected[(ctx.config.name, str(status))] += 1
        self.status = status
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
        self.state = DONE
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
        if self.state == HEAD and not self.buf:
            self.state = DONE
            self.transport.close()
        else:
            self.closing = True

    def abort(self, reason: str) -> None:
        if self.state == HEAD and self.buf:
            self._reject(408, reason)
            return
        self.state = DONE
        self.transport.close()
