"""Idle HTTP keep-alive connections in ``lbproxy upgrade`` (see handover.py).

A client connection waiting for its next request (nothing read of it, no exchange) moves
like a tunnel: its socket and what its access-log line needs (start, requests, bytes).
The new worker serves the next request on it; the client sees the same connection. One
with a request in flight stays: it finishes there and moves once idle, or closes after
its response (``Connection: close``) when the old generation leaves.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from lbproxy.core.states import ClientState
from lbproxy.proxy.admit import release
from lbproxy.proxy.connection import HttpClient
from lbproxy.proxy.listener import Listener
from lbproxy.proxy.splice import Detached

_DETACHED = Detached()
HEAD, DONE = ClientState.HEAD, ClientState.DONE


def idle_http(listener: Listener) -> list[HttpClient]:
    """``listener``'s client connections between two requests (plain listeners only)."""
    if listener.config.tls is not None:
        return []
    return [c for c in listener.connections if isinstance(c, HttpClient) and is_idle(c)]


def is_idle(c: HttpClient) -> bool:
    """Between two requests: nothing read of the next one, nothing left to write."""
    return (
        c.state is HEAD
        and not c.buf
        and c.exchange is None
        and not c.closing
        and not c.transport.is_closing()
        and not c.transport.get_write_buffer_size()
    )


def export_http(listener: Listener, conn: HttpClient) -> tuple[dict[str, Any], list[int]]:
    """Take ``conn`` out of this worker (no close, no log line) with a copy of its socket."""
    sock = conn.transport.get_extra_info("socket")
    fd = os.dup(sock.fileno())
    listener.connections.discard(conn)
    held = conn.held
    release(conn)  # (the admission count moves with it: adopted by the successor)
    conn.disarm()  # (the head deadline too: the sweep's, no timer)
    conn.advance(DONE)
    conn.transport.set_protocol(_DETACHED)
    conn.transport.abort()  # (its fd; the copy keeps the connection open)
    meta: dict[str, Any] = {
        "kind": "http",
        "listener": listener.name,
        "started": conn.started,
        "requests": conn.requests,
        "in": conn.nbytes_in,
        "out": conn.nbytes_out,
        "sides": [True],
        "held": held,
    }
    return meta, [fd]


async def import_http(listeners: dict[str, Listener], meta: dict[str, Any], fd: int) -> bool:
    """Serve a predecessor's idle keep-alive connection here."""
    listener = listeners.get(str(meta["listener"]))
    if listener is None:
        os.close(fd)
        return False
    ctx = listener.ctx
    held = str(meta.get("held", ""))
    if held and ctx.limits is not None:
        ctx.limits.adopt(held)  # (admitted before: counted here, not decided again)

    def moved() -> HttpClient:
        conn = HttpClient(ctx)
        conn.held = held if ctx.limits is not None else ""
        return conn

    sock = socket.socket(fileno=fd)
    try:
        _, conn = await asyncio.get_running_loop().connect_accepted_socket(moved, sock=sock)
    except OSError:
        sock.close()
        if held and ctx.limits is not None:
            ctx.limits.closed(held)
        return False
    ctx.stats.connections_total[ctx.config.name] -= 1  # (the old generation counted it)
    conn.started = float(meta["started"])
    conn.requests = int(meta["requests"])
    conn.nbytes_in, conn.nbytes_out = int(meta["in"]), int(meta["out"])
    return True
