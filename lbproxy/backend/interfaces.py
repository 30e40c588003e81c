"""What the backend's modules expect of each other, as Protocols (typing only).

The connection layer (protocol.py) and the server (server.py), and the chat hub (chat.py) and
its sessions (session.py), each need a few things of the other side. Those needs are written
here, so each side imports this module and never the other one: the import graph stays
acyclic. Like HAProxy's types-only headers, this module imports nothing from the package but
the frozen values of events.py (which import nothing from it).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from lbproxy.backend.events import Header, Response, ServerView, WebSocketRequest

# ---- the websocket connection and the chat (protocol.py <-> chat.py, session.py) -----------


class WsHandler(Protocol):
    """Application side of one accepted websocket (the chat session)."""

    def on_message(self, data: str | bytes) -> None: ...
    def on_too_big(self, size: int) -> None: ...
    def on_closed(self) -> None: ...


class ChatService(Protocol):
    """What the server needs from the chat (``chat.ChatHub``)."""

    max_message: int  # longest accepted chat message in bytes

    async def admit(self, request: WebSocketRequest) -> tuple[str, list[Header]] | Response:
        """The user name and extra 101 headers for a /chat upgrade, or the rejection."""
        ...

    def attach(self, peer: WsConnectionPeer, user: str) -> WsHandler: ...


class WsConnectionPeer(Protocol):
    """What a websocket handler may do with its connection."""

    def send_text(self, text: str) -> bool: ...
    def close(self, code: int, reason: str = "") -> None: ...
    def hold_reading(self, hold: bool) -> None: ...
    def write_buffer_size(self) -> int: ...


# ---- the chat hub and its sessions (chat.py <-> session.py) --------------------------------


class RoomMember(Protocol):
    """What the hub needs of a session that is in one of its rooms (``session.ChatSession``)."""

    user: str

    def deliver(self, room: str, msg_id: int, payload: str) -> None:
        """A message of ``room`` (its id and JSON text), live or caught up after a gap."""
        ...

    def gap(self, room: str, event: str, restart: bool) -> None:
        """The hub lost messages of ``room``; ``event`` is the history_gap to send."""
        ...


class HubRoom(Protocol):
    """A room of the hub, as a session joining it sees it (``chat.Room``)."""

    subscribed: asyncio.Event  # set once Redis confirmed the room's subscription


class RoomDirectory(Protocol):
    """What a session needs of its hub (``chat.ChatHub``): rooms, presence names, limits."""

    backend_id: str
    max_message: int

    def enter(self, name: str, member: RoomMember) -> HubRoom: ...

    def leave(self, name: str, member: RoomMember) -> bool:
        """Remove ``member`` from room ``name``; True when it was its user's last one here."""
        ...

    async def forget(self, name: str, user: str) -> None: ...
    def forget_later(self, name: str, user: str) -> None: ...

    def member(self, user: str) -> str:
        """The presence entry of ``user`` as connected through this backend."""
        ...


# ---- the server and its connections (server.py <-> protocol.py) ----------------------------


class ServedConnection(Protocol):
    """What the server does with its open connections (``protocol.Connection``)."""

    def close(self, code: int, reason: str = "") -> None:
        """Close the websocket with ``code`` (the drain's 1001)."""
        ...

    def abort(self) -> None: ...


class ConnectionHost(Protocol):
    """What a connection needs of its server (``server.BackendServer``)."""

    chat: ChatService | None  # None: the backend runs without Redis (no /chat)
    draining: bool
    connections: set[ServedConnection]
    websockets: set[ServedConnection]
    changed: asyncio.Event  # set whenever a websocket or a connection goes away

    def view(self) -> ServerView: ...
