"""The interfaces the proxy's modules talk through (types only, HAProxy's ``-t.h`` style).

Each side of a pair of modules that talk both ways (the client connection and its
upstream, the client and its native upgrade, the listener context and the engine) sees
the other only as one of these Protocols, so the import graph of ``lbproxy.proxy`` stays
acyclic even counting ``TYPE_CHECKING`` imports. This module imports nothing from
``lbproxy.proxy`` but the sans-IO ``retry`` (which imports nothing from the package).
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lbproxy._splice import Engine
    from lbproxy.http1 import RequestHead
    from lbproxy.pool import Backend
    from lbproxy.proxy.retry import Failure


class SplicerLike(Protocol):
    """A listener's native engine (splice.Splicer) as the connections use it."""

    @property
    def engine(self) -> Engine: ...

    @property
    def gone(self) -> asyncio.Transport: ...

    @property
    def detached(self) -> asyncio.Protocol: ...

    def offload(self, link: Any) -> bool: ...

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
    """The client connection as its native upgrade (native_upgrade.NativeUpgrade) sees it."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def tried(self) -> frozenset[str]: ...

    @property
    def transport(self) -> asyncio.Transport: ...

    @property
    def set_cookie(self) -> tuple[bytes, bytes] | None: ...

    @property
    def ip(self) -> str: ...

    @property
    def started(self) -> float: ...

    @property
    def nbytes_in(self) -> int: ...

    def request_bytes(self) -> bytes: ...

    def buffered(self) -> bytes: ...

    def reject(self, status: int, detail: str) -> None: ...

    def close_now(self) -> None: ...

    def count_failure(self, backend: Backend, failure: Failure, answered: bool) -> None: ...

    def begin_python_connect(self, backend: Backend) -> None: ...

    def arm_response_deadline(self) -> None: ...

    def adopt(self, backend: Backend, sock: socket.socket, data: bytes) -> None: ...

    def tunnel_started(self, backend: Backend) -> None: ...
