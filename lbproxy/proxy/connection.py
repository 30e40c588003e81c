"""http mode (L7), one client connection: heads, deadlines, keep-alive, closing; each request
an ``Exchange``. States (states.CLIENT_TRANSITIONS): HEAD -> CONNECTING -> FORWARD -> HEAD
again, or DONE (tunnelled, or closed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from lbproxy.core.http1 import MAX_HEAD, RequestHead, error_response, parse_request_head
from lbproxy.core.http1.lanes import match_quick_request, quick_websocket
from lbproxy.core.pool import Backend
from lbproxy.core.states import CLIENT_TRANSITIONS, ClientState, check
from lbproxy.errors import HttpError
from lbproxy.proxy.accesslog import log_connection
from lbproxy.proxy.admit import admit_head, admit_peer, release
from lbproxy.proxy.context import ListenerContext
from lbproxy.proxy.deadlines import Wait, body_stalled, next_body_check
from lbproxy.proxy.exchange import Exchange
from lbproxy.proxy.http_upstream import Upstream
from lbproxy.proxy.routing import (
    QUICK_GET,
    QUICK_LIMIT,
    QUICK_WEBSOCKET,
    affinity_key,
    forwarded_suffix,
    lane_key,
)
from lbproxy.proxy.tunnel import Linger

HEAD, CONNECTING, FORWARD, DONE = ClientState
# (Enum members as globals: see tunnel_rules)
WAIT_HEAD, KEEPALIVE, BODY, RESPONSE = Wait.HEAD, Wait.KEEPALIVE, Wait.BODY, Wait.RESPONSE


class HttpClient(asyncio.Protocol):
    """One client connection of an http listener (until it becomes a websocket tunnel)."""

    __slots__ = (
        "buf",
        "closing",
        "ctx",
        "defer",
        "exchange",
        "held",
        "ip",
        "last_backend",
        "logged",
        "nbytes_in",
        "nbytes_out",
        "port",
        "requests",
        "spare",
        "started",
        "state",
        "status",
        "suffix",
        "transport",
        "wait",
        "wait_mark",
        "wait_since",
    )

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = bytearray()
        self.state: ClientState = HEAD
        self.ip, self.port, self.held, self.defer = "", 0, "", 0  # (held, defer: admit.py)
        self.exchange: Exchange | None = None  # the request in flight
        self.spare: Exchange | None = None  # a finished one, for the next request to reuse
        self.last_backend: Backend | None = None
        self.logged = self.closing = False
        self.started = 0.0
        self.requests = self.status = 0
        self.suffix = b""  # the X-Forwarded-* lines (and the final CRLF) lane requests get
        self.nbytes_in = self.nbytes_out = 0
        self.wait: Wait | None = None  # its deadline's kind (in ctx.deadlines: the sweep's)
        self.wait_mark = 0  # (a streaming body: nbytes_in when last looked at, and since when)
        self.wait_since = 0.0

    def advance(self, new: ClientState) -> None:
        """The one place the connection changes state (states.CLIENT_TRANSITIONS)."""
        if new not in CLIENT_TRANSITIONS[self.state]:
            check(CLIENT_TRANSITIONS, self.state, new)  # (raises IllegalTransition)
        self.state = new

    def connecting(self) -> None:
        """The request is retried: no deadline, stop reading while a backend is connected."""
        self.disarm()
        self.advance(CONNECTING)
        self.transport.pause_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ctx = self.ctx
        self.transport = transport  # type: ignore[assignment]  # (a stream transport; no cast call)
        self.started = time.monotonic()
        ctx.stats.connections_total[ctx.config.name] += 1
        peer = transport.get_extra_info("peername")
        self.ip, self.port = (peer[0], peer[1]) if peer else ("", 0)
        if len(ctx.connections) >= ctx.config.max_connections:
            self.reject(503, "too many connections")
            return
        ctx.connections.add(self)
        self.suffix = forwarded_suffix(ctx, self.ip)  # (once, not per request)
        self.arm(WAIT_HEAD, self.started + ctx.config.handshake_timeout)
        if ctx.limits is not None and not self.held:  # (held: moved here, admitted before)
            admit_peer(self, ctx.limits)

    def data_received(self, data: bytes) -> None:
        self.nbytes_in += len(data)
        state = self.state
        if state is HEAD:
            if not self.buf and len(data) <= QUICK_LIMIT and not self.defer:
                # (quick_request never takes an Upgrade line; find: "in" on bytes raises inside)
                if data.find(b"\r\nUpgrade: websocket\r\n") >= 0 or not match_quick_request(data):
                    if quick_websocket(data) and self._quick_websocket(data):
                        return
                elif self._quick(data):
                    return
            self.buf += data
            self.try_head()
            return
        exchange = self.exchange
        if state is FORWARD and exchange is not None and exchange.tracker is not None:
            exchange.request_body(data)
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
        prev = self.state
        self.advance(DONE)
        self.ctx.connections.discard(self)
        self.disarm()
        self.spare = None  # (it refers back to this connection: no cycle left behind)
        exchange = self.exchange
        if exchange is not None:
            exchange.abandon(lost=True, drop_upstream=prev is not DONE)
        if self.requests:
            self._log(f"client closed after {self.requests} request(s)")
        release(self)

    def pause_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.transport.resume_reading()

    def try_head(self) -> None:
        try:
            parsed = parse_request_head(self.buf)
        except HttpError as exc:
            self.reject(exc.status, exc.reason)
            return
        if parsed is None:  # (a keep-alive wait ends: the handshake timeout applies)
            if self.wait is not WAIT_HEAD:
                self.arm(WAIT_HEAD, time.monotonic() + self.ctx.config.handshake_timeout)
            return
        head, used = parsed
        if self.defer and admit_head(self, head, used):
            return
        del self.buf[:used]
        self.dispatch(head)

    def _quick(self, data: bytes) -> bool:
        """Fast lane: a plain GET on a warm keep-alive upstream connection (False: full path)."""
        ctx = self.ctx
        pool = ctx.pool
        key = None
        if pool.config.balance == "hash":  # (lane_key's answer for the others, no call)
            lane, key = lane_key(ctx, self.ip)
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
            self.dispatch(parsed[0], backend)
            return True
        upstream: Upstream = transport.get_protocol()  # type: ignore[assignment]
        self._begin(QUICK_GET, data, key, FORWARD).send_quick(backend, upstream, data, now)
        return True

    def _begin(
        self, head: RequestHead, quick: bytes | None, key: bytes | None, state: ClientState
    ) -> Exchange:
        """A new request: its exchange; the connection moves to ``state``."""
        if state not in CLIENT_TRANSITIONS[self.state]:  # (advance() inlined: once a request)
            check(CLIENT_TRANSITIONS, self.state, state)
        self.state = state
        self.wait = None  # (its entry stays in ctx.deadlines until overwritten: no pop)
        self.requests += 1
        exchange = self.spare
        if exchange is None:
            exchange = Exchange(self, self.ctx, head, quick, key)
        else:  # (no object per keep-alive request)
            self.spare = None
            exchange.renew(head, quick, key)
        self.exchange = exchange
        return exchange

    def _quick_websocket(self, data: bytes) -> bool:
        """Fast lane for a plain websocket upgrade: route and forward it without re-parsing."""
        lane, key = lane_key(self.ctx, self.ip)
        if not lane:
            return False
        exchange = self._begin(QUICK_WEBSOCKET, data, key, CONNECTING)
        self.transport.pause_reading()  # (connecting(), the state already moved)
        exchange.route(None)  # (a websocket: the native engine if any, else Python)
        return True

    def dispatch(self, head: RequestHead, picked: Backend | None = None) -> None:
        exchange = self._begin(head, None, None, CONNECTING)
        exchange.key, exchange.set_cookie = affinity_key(self.ctx, self.ip, head)
        self.transport.pause_reading()
        exchange.route(picked)

    def arm(self, wait: Wait, when: float) -> None:
        self.wait = wait
        self.ctx.deadlines[self] = when

    def disarm(self) -> None:
        self.wait = None
        self.ctx.deadlines.pop(self, None)

    def wait_for(self, body: bool) -> None:
        """The request went out (or part of it): wait for the rest of its body, or the answer."""
        now = time.monotonic()
        if body:
            self.wait_mark = self.nbytes_in
            self.wait_since = now
            timeout = self.ctx.config.body_timeout
            self.arm(BODY, next_body_check(now, now, timeout))
        else:
            self.arm(RESPONSE, now + self.ctx.pool.config.response_timeout)

    def response_started(self) -> None:
        """The final response head (or 101): no response deadline (the entry stays: no pop)."""
        if self.wait is RESPONSE:
            self.wait = None

    def deadline_passed(self, now: float) -> None:
        wait = self.wait
        self.disarm()  # (wait None: an entry left behind, nothing to do)
        exchange = self.exchange
        if wait is WAIT_HEAD:
            if self.state is HEAD:
                self.reject(408, "request head not received in time")
        elif wait is KEEPALIVE:
            if self.state is HEAD and not self.buf:
                self.advance(DONE)
                self._log(f"idle for {self.ctx.config.keepalive_timeout:g}s between requests")
                self.transport.close()
        elif wait is BODY:
            if self.state is FORWARD and exchange is not None and exchange.tracker is not None:
                self._body_deadline(exchange, now)
        elif wait is RESPONSE and exchange is not None:
            exchange.response_timeout()

    def _body_deadline(self, exchange: Exchange, now: float) -> None:
        timeout = self.ctx.config.body_timeout
        if self.nbytes_in != self.wait_mark:
            self.wait_mark, self.wait_since = self.nbytes_in, now
        elif body_stalled(now, self.wait_since, timeout):
            if self.nbytes_out > exchange.mark_out:  # (the backend has begun its answer)
                exchange.drop_upstream()
                self.close_now()
            else:
                self.reject(408, "request body not received in time")
            return
        self.arm(BODY, next_body_check(now, self.wait_since, timeout))

    def request_done(self, close: bool) -> None:
        """The exchange's response is out: the next request, or close (``close``)."""
        done = self.exchange
        self.exchange = None
        if close or self.closing:
            self._close_after_response()
            return
        if done is not None and done.task is None and done.native is None:
            self.spare = done  # (nothing refers to it any more: the next request's)
        if HEAD not in CLIENT_TRANSITIONS[self.state]:  # (advance() inlined: once a request)
            check(CLIENT_TRANSITIONS, self.state, HEAD)
        self.state = HEAD
        if self.buf:
            self.try_head()
        else:  # (arm() inlined)
            self.wait = KEEPALIVE
            self.ctx.deadlines[self] = time.monotonic() + self.ctx.config.keepalive_timeout
            self.transport.resume_reading()

    def handed_over(self) -> None:
        """The exchange made this connection a websocket tunnel: this protocol is done."""
        ctx = self.ctx
        self.advance(DONE)
        self.exchange = self.spare = None  # (no reference cycle left for the collector)
        self.disarm()
        self.held = ""  # (the tunnel's end releases it)
        ctx.connections.discard(self)
        ctx.stats.handshake_seconds.observe(time.monotonic() - self.started)

    def write(self, data: bytes) -> None:
        self.nbytes_out += len(data)
        self.transport.write(data)

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
        self.advance(DONE)
        self.disarm()
        self.ctx.connections.discard(self)
        self._log(f"closed after {self.requests} request(s)")
        Linger.close(self.transport, self.ctx.loop)

    def close_now(self) -> None:
        """The backend went away in the middle of its answer: close the client."""
        self.advance(DONE)
        self.disarm()
        self.transport.close()

    def reject(
        self, status: int, detail: str, reason: str = "", extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Answer ``status`` (an error, with ``extra`` headers) and close."""
        ctx = self.ctx
        ctx.stats.rejected[(ctx.config.name, reason or str(status))] += 1
        self.disarm()
        exchange = self.exchange
        if exchange is not None:
            exchange.abandon(lost=False, drop_upstream=True)
        self.status = status
        self._log(f"rejected: {detail}")
        self.advance(DONE)
        if not self.transport.is_closing():
            self.write(error_response(status, detail=detail, extra_headers=extra))
            self.ctx.connections.discard(self)
            Linger.close(self.transport, self.ctx.loop)

    def activity(self) -> int:
        return self.nbytes_in + self.nbytes_out

    def flush_bytes(self) -> None:
        """Count the current request's bytes so far (a long response, SSE) in the stats."""
        if self.exchange is not None:
            self.exchange.flush_bytes()

    def go_away(self) -> None:
        if self.state is HEAD and not self.buf:
            self.advance(DONE)
            self.transport.close()
        else:
            self.closing = True

    finish_request = go_away

    def abort(self, reason: str) -> None:
        if self.state is HEAD and self.buf:
            self.reject(408, reason)
            return
        self.advance(DONE)
        self.transport.close()
