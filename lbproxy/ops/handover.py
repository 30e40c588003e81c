"""A worker's part of ``lbproxy upgrade``: give everything to its successor, or take it.

The supervisor connects each worker of the old generation to one of the new (a Unix
socket, handover_wire). On the supervisor's order the old worker sends its listening
sockets first (the very same sockets: their accept queues are kept), stops accepting,
then its established native tunnels in batches: each is frozen only for its own
hand-over (``Engine.export``), the engine forwarding the others meanwhile. Python-path
tunnels of plain listeners are first moved into the engine (``Splicer.offload``) and go
the same way. The new worker rebuilds each tunnel (``Engine.import_tunnel``) with its
Python side: listener, pool and backend, affinity key, byte counts (already flushed into
the old worker's counters, so nothing counts twice), start time (the access log line is
written once, by whoever sees it close) and drain state.

What does not move stays and leaves as on SIGTERM: TLS tunnels (the TLS state lives in
the old process's SSL objects), requests in flight (their connection closes after the
response), websocket handshakes still in progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol

from lbproxy.core.tunnel_rules import Where
from lbproxy.core.ws_rules import CloseKind
from lbproxy.ops.handover_http import export_http, idle_http, import_http, is_idle
from lbproxy.ops.handover_wire import (
    WireError,
    acknowledge,
    recv_message,
    send_message,
    send_paced,
)
from lbproxy.proxy.connection import HttpClient
from lbproxy.proxy.listener import Listener
from lbproxy.proxy.native_tunnel import NativeTunnel
from lbproxy.proxy.tunnel import Link

log = logging.getLogger("lbproxy.ops.upgrade")

BATCH = 25  # tunnels per message (each is frozen only while its batch moves)
WINDOW = 2  # batches in flight at most (the receiver acknowledges each one)
SETTLE = 1.0  # after the last move, how long to wait for handshakes that may yet move


class Listeners(Protocol):
    @property
    def listeners(self) -> Mapping[str, Listener]: ...


# -- the old worker ------------------------------------------------------------------
def _movable(listener: Listener) -> list[NativeTunnel]:
    """The tunnels of ``listener`` that can move now (Python ones moved into the engine)."""
    splicer = listener.ctx.splicer
    if splicer is None:
        return []
    found: list[NativeTunnel] = []
    for conn in listener.connections:
        if not isinstance(conn, NativeTunnel):
            continue
        if conn.where is Where.PYTHON and not (isinstance(conn, Link) and splicer.offload(conn)):
            continue
        if conn.where is Where.NATIVE and conn.slot >= 0:
            found.append(conn)
    return found


def export_link(listener: Listener, link: NativeTunnel) -> tuple[dict[str, Any], list[int]]:
    """Freeze ``link``: its descriptors and everything its successor needs; it leaves
    this worker without counting a close."""
    ctx = listener.ctx
    splicer = ctx.splicer
    assert splicer is not None
    link.flush_bytes()
    total_in, total_out = link.totals()
    key = ctx.pool.affinity_key(link)
    cfd, bfd, state = splicer.engine.export(link.slot, link)
    link.where = Where.NATIVE_DONE  # (no finish(): it goes on elsewhere)
    link.slot = -1
    ctx.tunnel_ended(link, link.backend, link.client_addr)  # (its count moves with it)
    meta: dict[str, Any] = {
        "listener": listener.name,
        "backend": link.backend.id,
        "key": key,
        "client": link.client_addr,
        "started": link.started,
        "in": total_in,
        "out": total_out,
        "reason": link.reason,
        "ws": link.ws,
        "sides": [cfd >= 0, bfd >= 0],
        "state": state,
    }
    if link.ws:  # (its message counts are flushed too: flush_bytes)
        meta.update(msgs=list(link.flushed_msgs), ws_close=int(link.ws_close))
        meta.update(first_close=link.first_close)
    return meta, [fd for fd in (cfd, bfd) if fd >= 0]


async def give(listeners: Mapping[str, Listener], sock: socket.socket, deadline: float) -> int:
    """Hand the listening sockets and every movable tunnel over; how many tunnels moved."""
    loop = asyncio.get_running_loop()
    names = [n for n, lst in listeners.items() if lst.server is not None and lst.server.sockets]
    fds = [listeners[n].server.sockets[0].fileno() for n in names]  # type: ignore[union-attr]
    await loop.run_in_executor(None, send_message, sock, {"t": "listeners", "names": names}, fds)
    for listener in listeners.values():
        listener.stop_accepting()  # (the successor holds the same sockets now)
    moved = 0
    last = time.monotonic()
    pace = Pace()
    while time.monotonic() < deadline:
        found: list[tuple[Listener, NativeTunnel | HttpClient]] = []
        for lst in listeners.values():
            found += [(lst, link) for link in _movable(lst)]
            found += [(lst, conn) for conn in idle_http(lst)]
        for at in range(0, len(found), BATCH):
            moved += await _send_batch(sock, found[at : at + BATCH], pace)
        if found:
            last = time.monotonic()
        elif time.monotonic() - last > SETTLE or not _waiting(listeners):
            break
        else:
            await asyncio.sleep(0.05)
    await loop.run_in_executor(None, send_message, sock, {"t": "done"}, [])
    return moved


class Pace:
    """Batches sent and not acknowledged yet."""

    def __init__(self) -> None:
        self.unacked = 0

    def acks_to_wait(self) -> int:
        """After one more send: how many acknowledgements to read to stay within WINDOW."""
        self.unacked += 1
        wait = max(0, self.unacked - WINDOW + 1)
        self.unacked -= wait
        return wait


async def _send_batch(
    sock: socket.socket, links: list[tuple[Listener, NativeTunnel | HttpClient]], pace: Pace
) -> int:
    """Export ``links`` (those still in the engine) and send them as one message."""
    batch: list[dict[str, Any]] = []
    fds: list[int] = []
    for listener, conn in links:
        if isinstance(conn, HttpClient):
            if is_idle(conn):  # (still idle)
                meta, conn_fds = export_http(listener, conn)
                batch.append(meta)
                fds += conn_fds
        elif conn.where is Where.NATIVE and conn.slot >= 0:  # (not finished meanwhile)
            meta, conn_fds = export_link(listener, conn)
            batch.append(meta)
            fds += conn_fds
    if not batch:
        return 0
    document = {"t": "tunnels", "tunnels": batch}
    acks = pace.acks_to_wait()
    try:
        await asyncio.get_running_loop().run_in_executor(
            None, send_paced, sock, document, fds, acks
        )
    finally:
        for fd in fds:
            os.close(fd)
    return len(batch)


def _waiting(listeners: Mapping[str, Listener]) -> bool:
    """Whether connections that may still become movable tunnels remain (plain listeners)."""
    return any(
        lst.ctx.splicer is not None
        and any(not isinstance(c, NativeTunnel) for c in lst.connections)
        for lst in listeners.values()
    )


# -- the new worker ------------------------------------------------------------------
def receive_listeners(sock: socket.socket) -> dict[str, socket.socket]:
    """(Blocking) the predecessor's listening sockets, by listener name."""
    message = recv_message(sock)
    if message is None:
        raise WireError("the previous generation closed the hand-over channel")
    document, fds = message
    names = document.get("names", [])
    if document.get("t") != "listeners" or len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        raise WireError("expected the listening sockets first")
    return {str(name): socket.socket(fileno=fd) for name, fd in zip(names, fds, strict=True)}


def import_link(listeners: Mapping[str, Listener], meta: dict[str, Any], fds: list[int]) -> bool:
    """Rebuild one tunnel here (the engine owns its fds after); False if it cannot be."""
    listener = listeners.get(str(meta["listener"]))
    splicer = None if listener is None else listener.ctx.splicer
    backend = None if listener is None else listener.ctx.pool.get(str(meta["backend"]))
    if listener is None or splicer is None or backend is None:
        for fd in fds:
            os.close(fd)
        return False
    ctx = listener.ctx
    it = iter(fds)
    cfd, bfd = (next(it) if present else -1 for present in meta["sides"])
    state: dict[str, Any] = meta["state"]
    # (a bare NativeTunnel: the engine forwards it here from the start)
    link = NativeTunnel(ctx, backend, str(meta["client"]), meta["started"], bool(meta["ws"]))
    total_in, total_out = int(meta["in"]), int(meta["out"])
    link.nbytes_in = total_in - int(state["client"]["nread"])
    link.nbytes = total_out - int(state["backend"]["nread"])
    link.flushed_in, link.flushed_out = total_in, total_out
    link.reason = str(meta["reason"])
    if link.ws and "msgs" in meta:
        msgs_in, msgs_out = (int(n) for n in meta["msgs"])
        link.msgs_in = msgs_in - int(state.get("msgs_in", 0))
        link.messages = msgs_out - int(state.get("msgs_out", 0))
        link.flushed_msgs = (msgs_in, msgs_out)
        link.ws_close = CloseKind(int(meta["ws_close"]))
        link.first_close = int(meta["first_close"])
    ctx.connections.add(link)
    if ctx.limits is not None:  # (counted as its predecessor did: tunnel_ended releases it)
        ctx.limits.adopt(link.client_addr)
    key = meta.get("key")
    ctx.pool.attach(backend, link, key if isinstance(key, bytes) else None)
    link.native_started(-1)  # (the engine may report its end from inside import_tunnel)
    try:
        slot = splicer.engine.import_tunnel(link, cfd, bfd, state)
    except (OSError, ValueError, TypeError, MemoryError) as exc:
        log.error("a tunnel could not be taken over: %s", exc)
        for fd in fds:
            os.close(fd)
        link.native_finished(f"hand-over failed: {exc}", 0, 0)
        return False
    if link.where is Where.NATIVE:
        link.slot = slot
        if link.reason.startswith("drained"):  # (it was going away: it goes on, grace again)
            link.reason = ""
            link.go_away()
    return True


async def take(listeners: Mapping[str, Listener], sock: socket.socket) -> int:
    """Take the predecessor's tunnels until it says done; how many were taken."""
    loop = asyncio.get_running_loop()
    taken = 0
    while True:
        try:
            message = await loop.run_in_executor(None, recv_message, sock)
        except WireError as exc:
            log.error("hand-over: %s", exc)
            break
        if message is None or message[0].get("t") == "done":
            break
        document, fds = message
        it = iter(fds)
        for meta in document.get("tunnels", []):
            mine = [next(it) for present in meta["sides"] if present]
            if meta.get("kind") == "http":
                taken += await import_http(dict(listeners), meta, mine[0])
            else:
                taken += import_link(listeners, meta, mine)
        acknowledge(sock)
    sock.close()
    return taken
