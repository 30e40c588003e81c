"""One chat websocket: its commands handled in order, its rooms, and what it has been sent.

Delivery guarantees per joined room: messages arrive in id order, each at most once (a
per-room ``last_id`` filter), and with no gap between the replay of stored history and live
messages: live messages that arrive while the replay runs are buffered, then the buffer is
flushed minus what the replay already sent.

What the sender of ``send`` receives: when it is a member of the room (on this connection), its
message reaches it like every other member, as one ``msg`` event; when it is not a member, that
``msg`` is sent to it directly. A repeated ``client_msg_id`` (same user and room, within the
dedupe window) stores nothing: the sender alone gets the originally stored ``msg`` (same id)
with ``"duplicate": true`` added, and nobody else gets anything.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass

from redis.exceptions import RedisError

from lbproxy.backend import chat_protocol as proto
from lbproxy.backend.history import EPOCH, TRIMMED, gap_reason
from lbproxy.backend.interfaces import RoomDirectory, WsConnectionPeer
from lbproxy.backend.store import ChatStore, Duplicate, Limited, Stored

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 5.0  # seconds a join waits for the room subscription before "unavailable"
REPLAY_BATCH = 500
MAX_ROOMS = 100  # rooms one connection may be in at once
INBOX_HIGH = 64  # queued client messages before we stop reading from the socket
INBOX_LOW = 16
MAX_OUTPUT = 8 * 1024 * 1024  # unsent bytes before a client is closed as too slow (1013)
UNAVAILABLE = (RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class _TooBig:
    size: int


class Membership:
    """This session in one room: the last id sent, and live messages held during a replay."""

    __slots__ = ("buffer", "last_id", "replaying")

    def __init__(self) -> None:
        self.last_id = 0
        self.replaying = True
        self.buffer: list[tuple[int, str]] = []


class ChatSession:
    """The chat side of one accepted /chat websocket (an interfaces.WsHandler and RoomMember)."""

    def __init__(
        self, hub: RoomDirectory, store: ChatStore, peer: WsConnectionPeer, user: str
    ) -> None:
        self.hub = hub
        self.store = store
        self.peer = peer
        self.user = user
        self.rooms: dict[str, Membership] = {}
        self.closed = False
        self._inbox: collections.deque[str | bytes | _TooBig] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._held = False

    # ---- WsHandler ----------------------------------------------------------------------------

    def on_message(self, data: str | bytes) -> None:
        ping = proto.quick_ping(data) if isinstance(data, str) else None
        if ping is not None:
            self._send(proto.pong(ping))  # at once: a liveness check of this backend
        else:
            self._enqueue(data)

    def on_too_big(self, size: int) -> None:
        self._enqueue(_TooBig(size))

    def on_closed(self) -> None:
        self.closed = True
        if self._worker is not None:
            self._worker.cancel()
        for room in list(self.rooms):
            self._leave(room)

    # ---- from the hub -------------------------------------------------------------------------

    def deliver(self, room: str, msg_id: int, payload: str) -> None:
        member = self.rooms.get(room)
        if member is None:
            return
        if member.replaying:
            member.buffer.append((msg_id, payload))
        elif msg_id > member.last_id:
            member.last_id = msg_id
            self._send(payload)

    def gap(self, room: str, event: str, restart: bool) -> None:
        """The hub lost messages of ``room`` (``event``, a history_gap); ``restart``: the room
        is in a new epoch, whose ids are not comparable with what was sent before."""
        member = self.rooms.get(room)
        if member is None or member.replaying:
            return  # a join in progress reads the store itself
        if restart:
            member.last_id = 0
        self._send(event)

    # ---- internals ----------------------------------------------------------------------------

    def _send(self, text: str) -> None:
        if self.closed:
            return
        self.peer.send_text(text)
        if self.peer.write_buffer_size() > MAX_OUTPUT:
            log.warning("chat: closing %s: %d bytes unread", self.user, MAX_OUTPUT)
            self.peer.close(1013, "client too slow")

    def _enqueue(self, item: str | bytes | _TooBig) -> None:
        self._inbox.append(item)
        if len(self._inbox) >= INBOX_HIGH and not self._held:
            self._held = True
            self.peer.hold_reading(True)
        if self._worker is None and not self.closed:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        try:
            while self._inbox and not self.closed:
                item = self._inbox.popleft()
                if self._held and len(self._inbox) <= INBOX_LOW:
                    self._held = False
                    self.peer.hold_reading(False)
                await self._handle(item)
        finally:
            self._worker = None

    async def _handle(self, item: str | bytes | _TooBig) -> None:
        if isinstance(item, _TooBig):
            limit = self.hub.max_message
            detail = f"message of {item.size} bytes is over the limit of {limit} bytes"
            self._send(proto.error("bad_request", detail=detail))
            return
        if isinstance(item, bytes):
            self._send(proto.error("bad_request", detail="binary frames are not supported"))
            return
        try:
            command = proto.parse_command(item)
        except proto.BadRequest as exc:
            self._send(proto.error("bad_request", detail=str(exc)))
            return
        try:
            await self._run(command)
        except UNAVAILABLE as exc:
            log.info("chat: redis unavailable for %s: %s", type(command).__name__, exc)
            self._send(proto.error("unavailable", **_context(command)))

    async def _run(self, command: proto.Command) -> None:
        if isinstance(command, proto.Send):
            await self._send_message(command)
        elif isinstance(command, proto.Join):
            await self._join(command)
        elif isinstance(command, proto.Presence):
            users = await self.store.presence_list(command.room)
            self._send(proto.presence(command.room, users))
        elif isinstance(command, proto.Ping):
            self._send(proto.pong(command))
        else:
            if self.rooms.pop(command.room, None) is not None and self.hub.leave(
                command.room, self
            ):
                await self.hub.forget(command.room, self.user)
            self._send(proto.left(command.room))

    async def _send_message(self, command: proto.Send) -> None:
        result = await self.store.send(command.room, self.user, command)
        if isinstance(result, Stored):
            if command.room not in self.rooms:
                self._send(result.payload)
        elif isinstance(result, Duplicate):
            self._send(proto.as_duplicate(result.payload))
        elif isinstance(result, Limited):
            retry = round(result.retry_after + 0.0005, 3)
            self._send(proto.error("rate_limited", retry_after=retry, **_context(command)))

    async def _join(self, command: proto.Join) -> None:
        room = command.room
        if room not in self.rooms and len(self.rooms) >= MAX_ROOMS:
            self._send(proto.error("bad_request", detail=f"at most {MAX_ROOMS} rooms at once"))
            return
        member = Membership()  # joining again restarts from the new ``since``
        self.rooms[room] = member
        hub_room = self.hub.enter(room, self)
        try:
            await asyncio.wait_for(hub_room.subscribed.wait(), JOIN_TIMEOUT)
            await self.store.presence_touch({room: [self.hub.member(self.user)]})
            if self.rooms.get(room) is not member:
                return
            await self._replay(room, member, command)
        except BaseException:
            if self.rooms.get(room) is member:
                self._leave(room)
            raise
        if self.rooms.get(room) is member:
            for msg_id, payload in sorted(member.buffer):
                if msg_id > member.last_id:
                    member.last_id = msg_id
                    self._send(payload)
            member.buffer.clear()
            member.replaying = False

    async def _replay(self, room: str, member: Membership, command: proto.Join) -> None:
        """``joined`` (with the epoch), then any history_gap, then the stored messages."""
        since = command.since
        view = await self.store.view(room, since or 0, 0 if since is None else REPLAY_BATCH)
        if self.rooms.get(room) is not member:
            return
        self._send(proto.joined(room, self.hub.backend_id, self.user, view.epoch))
        if since is None:
            return
        reason = gap_reason(since, command.epoch, view)
        if reason is not None:
            oldest = view.entries[0].id if view.entries and reason == TRIMMED else None
            self._send(proto.history_gap(room, reason, view.epoch, oldest))
        if reason == EPOCH:  # ids of the old epoch mean nothing now: all of the new one
            view = await self.store.view(room, 0, REPLAY_BATCH)
        entries = view.entries
        while True:
            if self.rooms.get(room) is not member:
                return
            for entry in entries:
                if entry.id > member.last_id:
                    member.last_id = entry.id
                    self._send(entry.payload)
            if len(entries) < REPLAY_BATCH:
                return
            entries = await self.store.read_after(room, entries[-1].id, REPLAY_BATCH)

    def _leave(self, room: str) -> None:
        if self.rooms.pop(room, None) is not None and self.hub.leave(room, self):
            self.hub.forget_later(room, self.user)


def _context(command: proto.Command) -> dict[str, str]:
    if isinstance(command, proto.Send):
        return {"request": "send", "room": command.room, "client_msg_id": command.client_msg_id}
    if isinstance(command, proto.Ping):
        return {"request": "ping"}
    return {"request": type(command).__name__.lower(), "room": command.room}
