"""Sans-IO server side of one backend connection: HTTP/1.1 (h11), then maybe a websocket (wsproto).

Feed bytes with :meth:`ServerConnection.receive_data`, collect events with
:meth:`ServerConnection.next_events`, answer with the ``send_*`` / ``accept_websocket`` methods,
and write :meth:`ServerConnection.data_to_send` to the peer. Close the transport once
:attr:`ServerConnection.must_close` is true and the output has been written. No sockets, no
asyncio: the I/O layer (``server.py``) is a thin loop around this class.
"""

from __future__ import annotations

import http
from collections.abc import Sequence

import h11
import wsproto
import wsproto.events as ws_events
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState as WsState
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from lbproxy.backend.events import (
    Event,
    Header,
    HttpRequest,
    Phase,
    WebSocketRequest,
    WsClosed,
    WsMessage,
    WsMessageTooBig,
    header_value,
)

__all__ = [
    "Event",
    "Header",
    "HttpRequest",
    "Phase",
    "ServerConnection",
    "WebSocketRequest",
    "WsClosed",
    "WsMessage",
    "WsMessageTooBig",
]

MAX_HEAD = 64 * 1024
DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _is_websocket_upgrade(headers: Sequence[Header]) -> bool:
    upgrade = (header_value(headers, "upgrade") or "").lower()
    connection = (header_value(headers, "connection") or "").lower()
    return upgrade == "websocket" and "upgrade" in {t.strip() for t in connection.split(",")}


class ServerConnection:
    """One client connection as a state machine: bytes in, events out, bytes to send."""

    __slots__ = (
        "_body",
        "_body_size",
        "_h11",
        "_handshake",
        "_message_size",
        "_out",
        "_parts",
        "_request",
        "_ws",
        "max_body",
        "max_message",
        "must_close",
        "phase",
    )

    def __init__(
        self, *, max_body: int = DEFAULT_MAX_BODY, max_message: int = DEFAULT_MAX_MESSAGE
    ) -> None:
        self.max_body = max_body
        self.max_message = max_message
        self.phase = Phase.HTTP
        self.must_close = False
        self._h11: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_HEAD
        )
        self._out: list[bytes] = []
        self._request: h11.Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._handshake: wsproto.WSConnection | None = None
        self._ws: WsConnection | None = None
        self._parts: list[str] | list[bytes] = []
        self._message_size = 0

    # ---- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self._ws is not None:
            if self._ws.state is not WsState.CLOSED:
                self._ws.receive_data(data or None)
        elif self._h11 is not None:
            self._h11.receive_data(data)

    def next_events(self) -> list[Event]:
        if self.phase is Phase.HTTP:
            return self._http_events()
        if self.phase is Phase.WEBSOCKET:
            return self._ws_events()
        return []

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    @property
    def websocket_open(self) -> bool:
        return self._ws is not None and self._ws.state is WsState.OPEN

    # ---- HTTP --------------------------------------------------------------------------------

    def _http_events(self) -> list[Event]:
        assert self._h11 is not None
        events: list[Event] = []
        while self.phase is Phase.HTTP and not self.must_close:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, str(exc))
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.ConnectionClosed):
                self._close()
                break
            ready = self._on_http_event(event)
            if ready is not None:
                events.append(ready)
                break  # one request at a time: h11 pauses until we answered
        return events

    def _on_http_event(self, event: object) -> Event | None:
        if isinstance(event, h11.Request):
            self._request = event
            self._body.clear()
            self._body_size = 0
        elif isinstance(event, h11.Data):
            self._body_size += len(event.data)
            if self._body_size > self.max_body:
                self._fail(413, "request body too large")
            else:
                self._body.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return self._request_complete()
        return None

    def _request_complete(self) -> Event | None:
        request = self._request
        assert request is not None
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers)
        target = request.target.decode("latin-1")
        if _is_websocket_upgrade(headers):
            handshake = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
            try:
                handshake.initiate_upgrade_connection(list(request.headers), request.target)
                list(handshake.events())
            except WsRemoteProtocolError as exc:
                hint = exc.event_hint
                status = hint.status_code if isinstance(hint, ws_events.RejectConnection) else 400
                self.send_response(status, [("content-type", "text/plain")], str(exc).encode())
                return None
            self._handshake = handshake
            self.phase = Phase.UPGRADING
            return WebSocketRequest(target, headers)
        body = b"".join(self._body)
        self._body.clear()
        return HttpRequest(request.method.decode("ascii"), target, headers, body)

    def _fail(self, status: int, reason: str) -> None:
        """A protocol error: answer it if a response can still be sent, then close."""
        if self._h11 is not None and self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"{status} {reason}\n".encode()
            headers = [("content-type", "text/plain"), ("connection", "close")]
            self._emit_response(status, headers, body, head_only=False)
        self._close()

    def send_response(
        self, status: int, headers: Sequence[Header], body: bytes, *, head_only: bool = False
    ) -> None:
        """Answer the current request (or a pending websocket request) with a whole response."""
        if self.phase is Phase.UPGRADING:
            self._handshake = None
            self.phase = Phase.HTTP
        self._emit_response(status, headers, body, head_only=head_only)
        self._end_cycle()

    def _emit_response(
        self, status: int, headers: Sequence[Header], body: bytes, *, head_only: bool
    ) -> None:
        assert self._h11 is not None
        all_headers = [*headers, ("content-length", str(len(body)))]
        self._send_h11(
            h11.Response(status_code=status, headers=all_headers, reason=_reason(status))
        )
        if body and not head_only:
            self._send_h11(h11.Data(data=body))
        self._send_h11(h11.EndOfMessage())

    def start_stream(self, status: int, headers: Sequence[Header]) -> None:
        """Start a response whose body follows in chunks (chunked transfer-encoding)."""
        self._send_h11(
            h11.Response(status_code=status, headers=list(headers), reason=_reason(status))
        )

    def send_chunk(self, data: bytes) -> None:
        if data:
            self._send_h11(h11.Data(data=data))

    def end_stream(self) -> None:
        self._send_h11(h11.EndOfMessage())
        self._end_cycle()

    def _send_h11(self, event: h11.Event) -> None:
        assert self._h11 is not None
        try:
            data = self._h11.send(event)
        except h11.LocalProtocolError:
            self._close()
            return
        if data:
            self._out.append(data)

    def _end_cycle(self) -> None:
        conn = self._h11
        if conn is None or self.must_close:
            return
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        elif conn.our_state in (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR) or (
            conn.our_state is h11.DONE and conn.their_state is not h11.DONE
        ):
            self._close()

    def _close(self) -> None:
        self.must_close = True
        self.phase = Phase.CLOSED

    # ---- websocket ---------------------------------------------------------------------------

    def accept_websocket(self, extra_headers: Sequence[Header] = ()) -> None:
        """Send the 101 for the pending WebSocketRequest and switch to websocket frames."""
        assert self.phase is Phase.UPGRADING and self._handshake is not None
        assert self._h11 is not None
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra_headers]
        self._out.append(self._handshake.send(ws_events.AcceptConnection(extra_headers=extra)))
        self._ws = self._handshake.connection
        trailing, _closed = self._h11.trailing_data
        self._handshake = None
        self._h11 = None
        self.phase = Phase.WEBSOCKET
        if trailing and self._ws is not None:
            self._ws.receive_data(bytes(trailing))

    def reject_websocket(self, status: int, body: bytes) -> None:
        self.send_response(status, [("content-type", "text/plain")], body)

    def send_message(self, data: str | bytes) -> bool:
        """Queue one websocket message; False when the websocket is no longer open."""
        ws = self._ws
        if ws is None or ws.state is not WsState.OPEN:
            return False
        if isinstance(data, str):
            self._out.append(ws.send(ws_events.TextMessage(data=data)))
        else:
            self._out.append(ws.send(ws_events.BytesMessage(data=data)))
        return True

    def close_websocket(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the transport closes when the peer answers."""
        ws = self._ws
        if ws is not None and ws.state in (WsState.OPEN, WsState.REMOTE_CLOSING):
            answering = ws.state is WsState.REMOTE_CLOSING
            self._out.append(ws.send(ws_events.CloseConnection(code=code, reason=reason)))
            if answering:
                self._close()

    def _ws_events(self) -> list[Event]:
        ws = self._ws
        assert ws is not None
        events: list[Event] = []
        for event in ws.events():
            if isinstance(event, ws_events.TextMessage | ws_events.BytesMessage):
                done = self._assemble(event)
                if done is not None:
                    events.append(done)
            elif isinstance(event, ws_events.Ping):
                self._out.append(ws.send(event.response()))
            elif isinstance(event, ws_events.CloseConnection):
                events.append(self._on_close(ws, event))
                break
        return events

    def _assemble(self, event: ws_events.TextMessage | ws_events.BytesMessage) -> Event | None:
        self._message_size += len(event.data)
        if self._message_size <= self.max_message:
            self._parts.append(event.data)  # type: ignore[arg-type]
        else:
            self._parts.clear()
        if not event.message_finished:
            return None
        size, parts = self._message_size, self._parts
        self._message_size = 0
        self._parts = []
        if size > self.max_message:
            return WsMessageTooBig(size)
        if isinstance(event, ws_events.TextMessage):
            return WsMessage("".join(parts))  # type: ignore[arg-type]
        return WsMessage(b"".join(parts))  # type: ignore[arg-type]

    def _on_close(self, ws: WsConnection, event: ws_events.CloseConnection) -> WsClosed:
        if ws.state is WsState.REMOTE_CLOSING:
            self._out.append(ws.send(event.response()))
        elif ws.state is WsState.OPEN:  # a parse failure: wsproto reports it as a close event
            self._out.append(ws.send(ws_events.CloseConnection(code=event.code)))
        self._close()
        return WsClosed(event.code, event.reason or "")
