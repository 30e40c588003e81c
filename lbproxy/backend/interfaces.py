"""What the backend's connection layer and the chat expect of each other (typing only)."""

from __future__ import annotations

from typing import Protocol

from lbproxy.backend.routes import Response
from lbproxy.backend.wire import Header, WebSocketRequest


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
