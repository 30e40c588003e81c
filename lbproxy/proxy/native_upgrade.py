"""A websocket upgrade whose backend side never becomes an asyncio transport.

With the native engine (splice.py), ``HttpClient`` asks it to connect to the chosen
backend and send the rewritten upgrade request; what the backend answers comes back
through ``on_data``. A plain ``101`` (the same fast lane as http_upstream) is spliced
into a tunnel at once: the engine already holds the backend socket, the client socket
joins it. Anything else — another status, a 101 the lane does not take, a client with
response bytes still buffered — hands the backend socket to the Python ``Upstream``
with the bytes read so far, which then carries on as if it had made the connection.
Failures before any answer are retried on other backends exactly as
``connect_with_retries`` / ``upstream_failed`` do (passive health included).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING

from lbproxy.http1 import MAX_HEAD, add_response_headers
from lbproxy.http1.lanes import switching_protocols
from lbproxy.pool import BackendState
from lbproxy.proxy.connect import LOCAL_ERRORS
from lbproxy.proxy.deadlines import untried
from lbproxy.proxy.http_upstream import Upstream
from lbproxy.proxy.tunnel import WsLink

if TYPE_CHECKING:
    from lbproxy.pool import Backend
    from lbproxy.proxy.http_client import HttpClient
    from lbproxy.proxy.splice import Splicer

CONNECT_ERRORS = {errno.ECONNREFUSED: "connect_refused", errno.ETIMEDOUT: "connect_timeout"}
UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}


def start(client: HttpClient, splicer: Splicer, first: Backend | None) -> bool:
    """Route and connect ``client``'s websocket upgrade natively; False: use the Python path."""
    head = client.head
    if head is None or head.body.kind != "none":
        return False
    client.nresp = bytearray()
    return attempt(client, splicer, first)


def attempt(client: HttpClient, splicer: Splicer, backend: Backend | None) -> bool:
    """One connection attempt (then others while attempts remain); False: use Python."""
    ctx = client.ctx
    pool = ctx.pool
    while True:
        if backend is None:
            backend = pool.pick(client.key, client.tried)
            if backend is None:
                status = 503 if not client.tried else 502
                client._reject(status, "no healthy backend" if status == 503 else "no backend")
                return True
        address = backend.address
        try:
            request = client.request_bytes()
            slot = splicer.engine.connect(client, address.host, address.port, request)
        except ValueError:  # a host name: the Python path resolves it
            if client.tried:
                client.begin_python_connect(backend)
                return True
            return False
        except OSError as exc:
            if exc.errno in LOCAL_ERRORS:  # lbproxy is out of fds or memory: not the backend
                ctx.stats.upstream_errors[(pool.name, backend.id, "local_resources")] += 1
                client._reject(503, "out of local resources")
                return True
            reason = CONNECT_ERRORS.get(exc.errno or 0, "connect_error")
            if not failed(client, backend, reason, reason):
                return True
            backend = None
            continue
        client.nslot = slot
        client.nbackend = backend
        client.timer = ctx.loop.call_later(pool.config.connect_timeout, timeout, client, slot)
        client.arm_response_deadline()
        return True


def failed(client: HttpClient, backend: Backend, error: str, passive: str) -> bool:
    """A connection to ``backend`` failed before any answer: count it; True to try another."""
    ctx = client.ctx
    pool = ctx.pool
    ctx.stats.upstream_errors[(pool.name, backend.id, error)] += 1
    pool.connect_failed(backend, passive)
    client.tried = client.tried | {backend.id}
    if len(client.tried) > pool.config.retries:
        client._reject(502, "backend unreachable")
        return False
    return True


def timeout(client: HttpClient, slot: int) -> None:
    """connect_timeout passed: give up on a connection that is not established yet."""
    if client.nslot != slot:
        return
    client.timer = None
    splicer = client.ctx.splicer
    backend = client.nbackend
    assert splicer is not None and backend is not None
    if splicer.engine.connected(slot, client):
        return  # connected: the answer may take its time (as on the Python path)
    splicer.engine.close(slot, client)
    client.nslot = -1
    if failed(client, backend, "connect_timeout", "connect_timeout"):
        attempt(client, splicer, None)


def response_timeout(client: HttpClient) -> None:
    """response_timeout passed with no (complete) answer from the backend the engine holds:
    a passive failure; another backend while attempts remain, else 504."""
    splicer = client.ctx.splicer
    backend = client.nbackend
    if client.nslot < 0 or splicer is None or backend is None:
        return
    if client.timer is not None:
        client.timer.cancel()
        client.timer = None
    splicer.engine.close(client.nslot, client)
    client.nslot = -1
    client.nresp = bytearray()  # (part of a head at most: nothing reached the client)
    ctx = client.ctx
    pool = ctx.pool
    ctx.stats.upstream_errors[(pool.name, backend.id, "response_timeout")] += 1
    pool.connect_failed(backend, "no response in time")
    client.tried = tried = client.tried | {backend.id}
    states = ((b.id, b.state is BackendState.UP) for b in pool.backends.values())
    if len(tried) > pool.config.retries or not untried(states, tried):
        client._reject(504, "backend sent no response in time")
        return
    attempt(client, splicer, None)


def on_data(client: HttpClient, data: bytes | None, err: int) -> None:
    """What the engine read from a pending backend connection (b"" = EOF, None = error)."""
    splicer = client.ctx.splicer
    backend = client.nbackend
    if client.nslot < 0 or splicer is None or backend is None:
        return  # (the client went away meanwhile: the engine connection was closed)
    if data:
        got(client, splicer, backend, data)
        return
    client.nslot = -1  # the engine has closed and released it
    if client.timer is not None:
        client.timer.cancel()
        client.timer = None
    if client.nresp:  # the answer had begun: nothing can be retried
        client.ctx.stats.upstream_errors[(client.ctx.pool.name, backend.id, "closed")] += 1
        client.close_now()
        return
    if err in CONNECT_ERRORS or err in UNREACHABLE:
        reason = CONNECT_ERRORS.get(err, "connect_error")
        retry = failed(client, backend, reason, reason)
    else:
        reason = "reset" if err else "closed"
        retry = failed(client, backend, reason, f"{reason} before answering")
    if retry:
        attempt(client, splicer, None)


def got(client: HttpClient, splicer: Splicer, backend: Backend, data: bytes) -> None:
    buf = client.nresp
    if not buf and client.timer is not None:
        client.timer.cancel()
        client.timer = None
    buf += data
    end = buf.find(b"\r\n\r\n") + 4
    if end < 4:
        if len(buf) > MAX_HEAD:
            hand_over(client, splicer, backend)  # (the Python client answers 502)
        else:
            splicer.engine.resume(client.nslot, client)  # the rest of the head, please
        return
    whole = bytes(buf)
    transport = client.transport
    if not switching_protocols(whole[:end]) or transport.get_write_buffer_size():
        hand_over(client, splicer, backend)
        return
    ctx = client.ctx
    ctx.pool.connect_succeeded(backend)
    to_client, head_len = whole, end
    if client.set_cookie is not None:
        head = add_response_headers(whole[:end], [client.set_cookie])
        to_client, head_len = head + whole[end:], len(head)
    sock = transport.get_extra_info("socket")
    if sock is None:
        hand_over(client, splicer, backend)
        return
    link = WsLink(ctx, backend, splicer.gone, transport, client.ip, client.started)
    link.skip = 0
    link.partial = b""
    link.saw_close = False
    if len(to_client) > head_len:
        link.feed(to_client[head_len:])
    to_backend = bytes(client.buf)
    link.client.nbytes = client.nbytes_in  # (the buffered client bytes are part of it)
    link.nbytes = len(to_client)
    slot = client.nslot
    try:
        cfd = os.dup(sock.fileno())
    except OSError:  # out of fds for the moment: the Python client and tunnel carry it
        hand_over(client, splicer, backend)
        return
    client.nslot = -1
    client.tunnel_started()
    link.slot = slot
    link.native_started(slot)  # (before splice(): the engine may report its end at once)
    ctx.connections.add(link)
    ctx.pool.attach(backend, link, client.key)
    try:
        splicer.engine.splice(
            slot,
            client,
            link,
            cfd,
            to_client,
            to_backend,
            True,
            link.partial,
            link.skip,
            link.saw_close,
        )
    except (KeyError, ValueError, MemoryError):  # (cannot happen while the engine holds it)
        os.close(cfd)
        link.slot = -1
        ctx.connections.discard(link)
        ctx.pool.detach(backend, link)
        client.close_now()
        return
    # the client's transport closes its own fd; the engine has the duplicate
    transport.set_protocol(splicer.detached)
    transport.abort()


def hand_over(client: HttpClient, splicer: Splicer, backend: Backend) -> None:
    """Give the backend socket and the bytes read so far to a Python Upstream."""
    fd = splicer.engine.release(client.nslot, client)
    client.nslot = -1
    sock = socket.socket(fileno=fd)
    data = bytes(client.nresp)
    client.nresp = bytearray()
    client.task = client.ctx.loop.create_task(adopt(client, backend, sock, data))


async def adopt(client: HttpClient, backend: Backend, sock: socket.socket, data: bytes) -> None:
    ctx = client.ctx
    try:
        transport, upstream = await ctx.loop.create_connection(
            lambda: Upstream(ctx, backend), sock=sock
        )
    except OSError:
        client.task = None
        sock.close()
        client._reject(502, "backend connection lost")
        return
    client.task = None
    if client.state_is_connecting():
        client.adopted(backend, upstream)
        upstream.data_received(data)
    else:
        transport.close()
