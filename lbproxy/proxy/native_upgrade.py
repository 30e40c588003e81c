"""A websocket upgrade whose backend side never becomes an asyncio transport.

With the native engine (splice.py), the client connection asks a ``NativeUpgrade`` to
connect to the chosen backend and send the rewritten upgrade request; what the backend
answers comes back through ``on_data``. A plain ``101`` (the same fast lane as
http_upstream) is spliced into a tunnel at once: the engine already holds the backend
socket, the client socket joins it. Anything else — another status, a 101 the lane does
not take, a client with response bytes still buffered — hands the backend socket to the
Python ``Upstream`` with the bytes read so far, which then carries on as if it had made
the connection. Failures before any answer go through ``retry.decide`` exactly as the
Python path's do (passive health included).

The upgrade talks to its exchange only through ``types.UpgradeClient`` and to the client
connection through ``types.ConnectionSide`` (public members), and is the engine's
``owner`` of the pending backend connection.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

from lbproxy.core.http1 import MAX_HEAD, add_response_headers
from lbproxy.core.http1.lanes import switching_protocols
from lbproxy.core.pool import BackendState
from lbproxy.core.retry import Answer, Facts, Failure, Retry, decide, from_errno
from lbproxy.core.wsframe import FrameCursor
from lbproxy.proxy.context import ListenerContext
from lbproxy.proxy.deadlines import Wait
from lbproxy.proxy.http_upstream import Upstream
from lbproxy.proxy.native_tunnel import NativeTunnel

if TYPE_CHECKING:
    from lbproxy.core.pool import Backend
    from lbproxy.proxy.types import ConnectionSide, SplicerLike, UpgradeClient

RESPONSE = Wait.RESPONSE  # (an Enum member as a global: see tunnel_rules.py)


class NativeUpgrade:
    """One websocket upgrade request on the native engine (attempts until an outcome)."""

    __slots__ = ("answer_by", "backend", "client", "conn", "ctx", "resp", "slot", "splicer")

    def __init__(
        self,
        client: UpgradeClient,
        conn: ConnectionSide,
        ctx: ListenerContext,
        splicer: SplicerLike,
    ) -> None:
        self.client = client  # the exchange (its request, attempts, outcome)
        self.conn = conn  # its client connection (transport, buffered bytes, answers)
        self.ctx = ctx
        self.splicer = splicer
        self.slot = -1
        self.backend: Backend | None = None
        self.resp = bytearray()  # the backend's answer so far
        self.answer_by = 0.0  # the attempt's response deadline (its connect one: the sweep's)

    @property
    def pending(self) -> bool:
        """Whether the engine holds a backend connection of this upgrade."""
        return self.slot >= 0

    def attempt(self, backend: Backend | None) -> bool:
        """One connection attempt (then others while attempts remain); False: use Python."""
        client = self.client
        ctx = self.ctx
        pool = ctx.pool
        self.resp = bytearray()
        while True:
            if backend is None:
                backend = pool.pick(client.key, client.tried)
                if backend is None:
                    self._act(decide(Failure.NO_BACKEND, Facts(tried=len(client.tried))))
                    return True
            address = backend.address
            try:
                request = client.request_bytes()
                slot = self.splicer.engine.connect(self, address.host, address.port, request)
            except ValueError:  # a host name: the Python path resolves it
                if client.tried:
                    client.begin_python_connect(backend)
                    return True
                return False
            except OSError as exc:
                if not self._failed(backend, from_errno(exc.errno or 0)):
                    return True
                backend = None
                continue
            self.slot = slot
            self.backend = backend
            # the request is out: the sweep checks the connect deadline first (no timer per
            # connection), then the response's (``deadline_passed``)
            now = time.monotonic()
            config = pool.config
            self.answer_by = now + config.response_timeout
            self.conn.arm(RESPONSE, min(now + config.connect_timeout, self.answer_by))
            return True

    def _failed(self, backend: Backend, failure: Failure, answered: bool = False) -> bool:
        """An attempt at ``backend`` failed: count it, decide; True to try another."""
        client = self.client
        client.count_failure(backend, failure, answered)
        pool = self.ctx.pool
        others = True
        if failure is Failure.RESPONSE_TIMEOUT:
            others = any(
                b.state is BackendState.UP and b.id not in client.tried
                for b in pool.backends.values()
            )
        facts = Facts(
            answered=answered, tried=len(client.tried), retries=pool.config.retries, others=others
        )
        return self._act(decide(failure, facts))

    def _act(self, action: Retry | Answer | object) -> bool:
        if isinstance(action, Retry):
            return True
        if isinstance(action, Answer):
            self.conn.reject(action.status, action.detail)
        else:
            self.conn.close_now()
        return False

    def close(self) -> None:
        """Close a backend connection still being set up (client gone or rejected)."""
        if self.slot >= 0:
            self.splicer.engine.close(self.slot, self)
            self.slot = -1

    def deadline_passed(self) -> None:
        """The attempt's deadline passed (the listener's sweep, through the exchange): before
        ``answer_by`` it is connect_timeout's, after it response_timeout's. Either way a
        passive failure; another backend while attempts remain, else 504."""
        backend = self.backend
        slot = self.slot
        if slot < 0 or backend is None:
            return
        if time.monotonic() < self.answer_by:  # connect_timeout
            if self.resp or self.splicer.engine.connected(slot, self):
                # connected: the answer may take its time (as on the Python path)
                self.conn.arm(RESPONSE, self.answer_by)
                return
            self.close()
            if self._failed(backend, Failure.CONNECT_TIMEOUT):
                self.attempt(None)
            return
        self.close()
        self.resp = bytearray()  # (part of a head at most: nothing reached the client)
        if self._failed(backend, Failure.RESPONSE_TIMEOUT):
            self.attempt(None)

    def on_data(self, data: bytes | None, err: int) -> None:
        """The engine's report for the pending backend connection (b"" = EOF, None = error;
        the engine calls ``NativeUpgrade.on_data`` itself, see splice.py)."""
        backend = self.backend
        if self.slot < 0 or backend is None:
            return  # (the client went away meanwhile: the engine connection was closed)
        if data:
            self._got(backend, data)
            return
        self.slot = -1  # the engine has closed and released it
        if self.resp:  # the answer had begun: nothing can be retried
            self._failed(backend, Failure.CLOSED, answered=True)
            return
        if self._failed(backend, from_errno(err, connecting=False)):
            self.attempt(None)

    def _got(self, backend: Backend, data: bytes) -> None:
        buf = self.resp
        buf += data
        end = buf.find(b"\r\n\r\n") + 4
        if end < 4:
            if len(buf) > MAX_HEAD:
                self._hand_over(backend)  # (the Python client answers 502)
            else:
                self.splicer.engine.resume(self.slot, self)  # the rest of the head, please
            return
        whole = bytes(buf)
        transport = self.conn.transport
        if not switching_protocols(whole[:end]) or transport.get_write_buffer_size():
            self._hand_over(backend)
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            self._hand_over(backend)
            return
        if backend.failures:
            self.ctx.pool.connect_succeeded(backend)
        self._splice(backend, sock, whole, end)

    def _splice(self, backend: Backend, sock: socket.socket, whole: bytes, end: int) -> None:
        """A plain 101: the engine joins the client socket to the backend's."""
        client = self.client
        ctx = self.ctx
        conn = self.conn
        transport = conn.transport
        to_client, head_len = whole, end
        if client.set_cookie is not None:
            head = add_response_headers(whole[:end], [client.set_cookie])
            to_client, head_len = head + whole[end:], len(head)
        tunnel = NativeTunnel(ctx, backend, conn.ip, conn.started)
        partial, skip, saw_close = b"", 0, False  # the frame cursor, at a boundary
        if len(to_client) > head_len:  # (frames sent with the 101: where they leave it)
            cursor = FrameCursor()
            cursor.feed(to_client[head_len:])
            partial, skip, saw_close = cursor.partial, cursor.skip, cursor.saw_close
            tunnel.messages = cursor.messages  # (their data messages are counted here)
            tunnel.first_close = 2 if saw_close else 0  # (the backend's close came first)
        to_backend = bytes(conn.buf)
        tunnel.nbytes_in = conn.nbytes_in  # (the buffered client bytes are part of it)
        tunnel.nbytes = len(to_client)
        slot = self.slot
        try:
            cfd = os.dup(sock.fileno())
        except OSError:  # out of fds for the moment: the Python client and tunnel carry it
            self._hand_over(backend)
            return
        self.slot = -1
        client.tunnel_started(backend)
        tunnel.native_started(slot)  # (before splice(): the engine may report its end at once)
        ctx.connections.add(tunnel)
        ctx.pool.attach(backend, tunnel, client.key)
        engine = self.splicer.engine
        try:
            engine.splice(
                slot, self, tunnel, cfd, to_client, to_backend, True, partial, skip, saw_close
            )
        except (KeyError, ValueError, MemoryError):  # (cannot happen while the engine holds it)
            os.close(cfd)
            tunnel.slot = -1
            ctx.connections.discard(tunnel)
            ctx.pool.detach(backend, tunnel)
            conn.close_now()
            return
        # the client's transport closes its own fd; the engine has the duplicate
        transport.set_protocol(self.splicer.detached)
        transport.abort()

    def _hand_over(self, backend: Backend) -> None:
        """Give the backend socket and the bytes read so far to a Python Upstream."""
        fd = self.splicer.engine.release(self.slot, self)
        self.slot = -1
        self.conn.arm(RESPONSE, self.answer_by)  # (past the connect deadline: the response's)
        sock = socket.socket(fileno=fd)
        data = bytes(self.resp)
        self.resp = bytearray()
        self.client.run(self._adopt(backend, sock, data))

    async def _adopt(self, backend: Backend, sock: socket.socket, data: bytes) -> None:
        ctx = self.ctx
        try:
            _, upstream = await ctx.loop.create_connection(
                lambda: Upstream(ctx, backend), sock=sock
            )
        except OSError:
            self.client.run(None)
            sock.close()
            self.conn.reject(502, "backend connection lost")
            return
        self.client.run(None)
        self.client.adopted(backend, upstream, data)
