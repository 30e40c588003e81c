"""The interfaces the proxy's modules talk through (types only, HAProxy's ``-t.h`` style).

Each side of a pair of modules that talk both ways (the client connection and its
upstream, the client and its native upgrade, the listener context and the engine) sees
the other only as one of these Protocols, so the import graph of ``lbproxy.proxy`` stays
acyclic even counting ``TYPE_CHECKING`` imports. This module imports nothing from
``lbproxy.proxy`` but, for annotations, the sans-IO ``retry``, ``states`` and ``deadlines``
(which import nothing of the proxy's I/O modules).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lbproxy._splice import Engine
    from lbproxy.core.http1 import RequestHead
    from lbproxy.core.pool import Backend
    from lbproxy.core.retry import Failure
    from lbproxy.core.states import ClientState
    from lbproxy.proxy.deadlines import Wait


class SplicerLike(Protocol):
    """A listener's native engine (splice.Splicer) as the connections use it."""

    @property
    def engine(self) -> Engine: ...

    @property
    def gone(self) -> asyncio.Transport: ...

    @property
    def detached(self) -> asyncio.Protocol: ...

    def offload(self, link: Any) -> bool: ...

    def sweep(self, now: float) -> None: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


class ClientSide(Protocol):
    """The client connection of the request an upstream connection answers."""

    status: int

    @property
    def head(self) -> RequestHead | None: ...

    @property
    def transport(self) -> asyncio.Transport: ...

    @property
    def tracker(self) -> object:
        """The request body still being read (None: sent whole)."""

    def write(self, data: bytes) -> None: ...

    def will_close(self) -> bool: ...

    def response_started(self) -> None: ...

    def response_done(self, close_client: bool) -> None: ...

    def start_tunnel(self, upstream: Any, to_client: bytes, head_len: int) -> None: ...

    def upstream_failed(self, got_response: bool, failure: Failure) -> None: ...


class UpgradeClient(Protocol):
    """The exchange as its native upgrade (native_upgrade.NativeUpgrade) sees it."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def tried(self) -> frozenset[str]: ...

    @property
    def set_cookie(self) -> tuple[bytes, bytes] | None: ...

    def request_bytes(self) -> bytes: ...

    def count_failure(self, backend: Backend, failure: Failure, answered: bool) -> None: ...

    def begin_python_connect(self, backend: Backend) -> None: ...

    def run(self, step: Coroutine[Any, Any, None] | None) -> None:
        """Run ``step`` as the request's pending task (None: the task is over)."""

    def adopted(self, backend: Backend, upstream: asyncio.Protocol, data: bytes) -> None: ...

    def tunnel_started(self, backend: Backend) -> None: ...


class ConnectionSide(Protocol):
    """The client connection (connection.HttpClient) as its exchange sees it."""

    buf: bytearray
    status: int
    last_backend: Backend | None
    wait: Wait | None  # its deadline's kind (the deadline: ListenerContext.deadlines[conn])

    @property
    def transport(self) -> asyncio.Transport: ...

    @property
    def state(self) -> ClientState: ...

    @property
    def exchange(self) -> object:
        """The exchange in flight (an exchange checks it is still the current one)."""

    @property
    def closing(self) -> bool: ...

    @property
    def ip(self) -> str: ...

    @property
    def started(self) -> float: ...

    @property
    def nbytes_in(self) -> int: ...

    @property
    def nbytes_out(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def response_started(self) -> None: ...

    @property
    def suffix(self) -> bytes:
        """The X-Forwarded-* lines (and the final CRLF) fast-lane requests get."""

    def arm(self, wait: Wait, when: float) -> None: ...

    def deadline_passed(self, now: float) -> None: ...

    def wait_for(self, body: bool) -> None: ...

    def advance(self, new: ClientState) -> None: ...

    def connecting(self) -> None: ...

    def request_done(self, close: bool) -> None: ...

    def handed_over(self) -> None: ...

    def reject(self, status: int, detail: str) -> None: ...

    def close_now(self) -> None: ...

    def go_away(self) -> None: ...
