"""Where admission control (admission.py) meets the client connections: one check per new
connection, a 429 (http) or a close without a byte (tcp) when a limit is reached.

The client IP is the peer; when the peer is a trusted proxy (http mode) it is the hop that
proxy added to X-Forwarded-For, checked once the connection's first request head is parsed
(then only the rate applies: the connections are the proxy's, not the client's)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import Protocol

from lbproxy.core.http1 import RequestHead
from lbproxy.core.limits import CONNECTIONS, Decision
from lbproxy.proxy.admission import Admission
from lbproxy.proxy.context import ListenerContext


class AdmittedHttp(Protocol):
    """The part of an http client connection (connection.HttpClient) admission uses."""

    ctx: ListenerContext
    ip: str
    held: str  # the IP its connection is counted under ("" = not counted)
    defer: int  # AT_HEAD, PENDING (the request heads wait), or 0
    transport: asyncio.Transport
    buf: bytearray

    def reject(
        self, status: int, detail: str, reason: str = "", extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None: ...
    def dispatch(self, head: RequestHead) -> None: ...
    def try_head(self) -> None: ...


AT_HEAD = 1  # a trusted proxy's connection: admitted on the client IP of its first request
PENDING = 2  # the shared limits are deciding: request heads wait in the buffer


def refuse(conn: AdmittedHttp, decision: Decision) -> None:
    what = "open connections" if decision.reason == CONNECTIONS else "new connections"
    detail = f"too many {what} from this client"
    conn.reject(429, detail, decision.reason, (decision.retry_after_header(),))


def admit_peer(conn: AdmittedHttp, limits: Admission) -> None:
    """A new http connection (after connection_made took it)."""
    ip = conn.ip
    if conn.ctx.is_trusted(ip):
        conn.defer = AT_HEAD
        return

    def done(decision: Decision) -> None:
        conn.defer = 0
        if conn.transport.is_closing():
            if decision.admitted:
                limits.closed(ip)
        elif decision.admitted:
            conn.held = ip
            conn.transport.resume_reading()
            if conn.buf:
                conn.try_head()
        else:
            refuse(conn, decision)

    decision = limits.check(ip, done)
    if decision is None:
        conn.defer = PENDING
        conn.transport.pause_reading()
    elif decision.admitted:
        conn.held = ip
    else:
        refuse(conn, decision)


def release(conn: AdmittedHttp) -> None:
    """The connection ended (not as a tunnel: the tunnel's end releases those)."""
    limits = conn.ctx.limits
    if conn.held and limits is not None:
        limits.closed(conn.held)
        conn.held = ""


def forwarded_client(head: RequestHead, peer: str) -> str:
    """The hop the (trusted) peer added to X-Forwarded-For: its last entry, if an IP."""
    last = ""
    for name, value in head.headers:
        if name.lower() == b"x-forwarded-for":
            last = value.decode("latin-1").rsplit(",", 1)[-1].strip()
    try:
        return str(ipaddress.ip_address(last))
    except ValueError:
        return peer


def admit_head(conn: AdmittedHttp, head: RequestHead, used: int) -> bool:
    """A parsed request head (``used`` bytes of the buffer) while ``conn.defer``: True when
    admission takes it (waiting, refused, or dispatched after deciding), False to go on."""
    if conn.defer == PENDING:
        return True  # (stays in the buffer until the connection is admitted)
    conn.defer = 0
    limits = conn.ctx.limits
    if limits is None:
        return False
    ip = forwarded_client(head, conn.ip)
    del conn.buf[:used]

    def done(decision: Decision) -> None:
        if conn.transport.is_closing():
            return
        if decision.admitted:
            conn.dispatch(head)
        else:
            refuse(conn, decision)

    decision = limits.check(ip, done, count=False)
    if decision is None:
        conn.transport.pause_reading()
    elif decision.admitted:
        conn.dispatch(head)
    else:
        refuse(conn, decision)
    return True


class AdmittedTcp(Protocol):
    """The part of a tcp client connection (tcp_conn.TcpClient) admission uses."""

    ctx: ListenerContext
    held: str
    peer: tuple[str, int]
    transport: asyncio.Transport | None

    def start(self) -> None: ...
    def refused(self, reason: str) -> None: ...


def admit_tcp(client: AdmittedTcp, limits: Admission) -> bool:
    """A new tcp connection: True to connect it now; otherwise it is closed (refused) or
    ``client.start()`` follows once admitted."""
    ip = client.peer[0]

    def done(decision: Decision) -> None:
        transport = client.transport
        if transport is None or transport.is_closing():
            if decision.admitted:
                limits.closed(ip)
        elif decision.admitted:
            client.held = ip
            client.start()
        else:
            client.refused(decision.reason)

    decision = limits.check(ip, done)
    if decision is None:
        return False
    if decision.admitted:
        client.held = ip
        return True
    client.refused(decision.reason)
    return False
