"""Values of the backend's sans-IO parts: the connection's events (wire.py) and the routes'
answers (routes.py). Frozen values, no I/O; imports nothing else from the package, so the
Protocols of interfaces.py can name these types without an import cycle."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

Header = tuple[str, str]


class _Target:
    """Accessors shared by requests: path, query parameters, headers (no slots of its own)."""

    if not TYPE_CHECKING:
        __slots__ = ()
    target: str
    headers: tuple[Header, ...]

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query))

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


@dataclass(frozen=True, slots=True)
class HttpRequest(_Target):
    """A complete plain HTTP request (head and body). Header names are lower case."""

    method: str
    target: str
    headers: tuple[Header, ...]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class WebSocketRequest(_Target):
    """A valid websocket upgrade request; answer with accept_websocket or reject_websocket."""

    target: str
    headers: tuple[Header, ...]


@dataclass(frozen=True, slots=True)
class WsMessage:
    """One complete websocket message (text as str, binary as bytes)."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class WsMessageTooBig:
    """A message longer than ``max_message`` arrived; its content was discarded."""

    size: int


@dataclass(frozen=True, slots=True)
class WsClosed:
    """The websocket is closed (close frame received, protocol error, or connection lost)."""

    code: int
    reason: str


Event = HttpRequest | WebSocketRequest | WsMessage | WsMessageTooBig | WsClosed


# ---- what the routes answer (routes.py) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: tuple[Header, ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class StreamResponse:
    """A body of ``total`` bytes of ``routes.slow_body``, sent in ``chunk`` byte pieces."""

    status: int
    headers: tuple[Header, ...]
    total: int
    chunk: int
    delay: float  # seconds between chunks


@dataclass(frozen=True, slots=True)
class ServerView:
    """What a route may know about the server at the time of the request."""

    backend_id: str
    connections: int
    draining: bool
    page: bytes


class Phase(enum.Enum):
    HTTP = "http"  # h11 request/response cycles
    UPGRADING = "upgrading"  # a websocket request waits for accept_websocket/reject_websocket
    WEBSOCKET = "websocket"
    CLOSED = "closed"


def header_value(headers: Iterable[Header], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None
