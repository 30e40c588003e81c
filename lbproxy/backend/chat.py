"""The chat hub of one backend: rooms with local members, fed by Redis pub/sub.

One pub/sub connection per backend, subscribed to the channel of every room that has a local
member. A room is usable (``Room.subscribed``) once Redis confirmed its subscription: from then
on every message stored in the room reaches this backend, and anything older is in the room's
stream, which joins replay. If the pub/sub connection fails (error, or no answer to PING), it
is re-opened with backoff and every room is subscribed again; at each confirmation the hub
re-reads the room's stream after the last id it delivered, so local members get what was
published while the subscription was down (members drop anything they already have by id).
When that catch-up cannot be complete (the messages were trimmed meanwhile, or the room is in
a new epoch: Redis lost its data), local members get a ``history_gap`` first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from lbproxy.backend import chat_protocol as proto
from lbproxy.backend.admission import admit
from lbproxy.backend.history import EPOCH, TRIMMED, gap_reason
from lbproxy.backend.interfaces import RoomMember, WsConnectionPeer
from lbproxy.backend.options import BackendOptions
from lbproxy.backend.ratelimit import RateLimit
from lbproxy.backend.routes import Response
from lbproxy.backend.session import REPLAY_BATCH, ChatSession
from lbproxy.backend.store import MEMBER_SEPARATOR, ChatStore, StoreSettings
from lbproxy.backend.wire import Header, WebSocketRequest

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0  # seconds between PINGs on an idle pub/sub connection
DEAD_AFTER = 3.0  # no answer at all for this long: the pub/sub connection is re-opened
BACKOFF_BASE, BACKOFF_CAP = 0.05, 2.0


class Room:
    """A room with members on this backend."""

    __slots__ = ("channel", "epoch", "last_id", "members", "name", "subscribed", "users")

    def __init__(self, name: str, channel: str) -> None:
        self.name = name
        self.channel = channel
        self.members: dict[RoomMember, None] = {}
        self.users: collections.Counter[str] = collections.Counter()
        self.last_id: int | None = None  # newest id delivered here; None before the 1st sub
        self.epoch: str | None = None  # the room's epoch when last_id was read
        self.subscribed = asyncio.Event()


def open_client(url: str) -> Redis:
    client: Redis = Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=3.0,
        retry=Retry(NoBackoff(), 1),  # one retry: a send is idempotent by client_msg_id
    )
    return client


class ChatHub:
    """Rooms, the pub/sub subscription and presence of one backend.

    An ``interfaces.ChatService`` for the connections and an ``interfaces.RoomDirectory``
    for its sessions.
    """

    def __init__(self, options: BackendOptions, backend_id: str) -> None:
        assert options.redis_url is not None
        self.options = options
        self.backend_id = backend_id
        self.max_message = options.max_message
        self.instance = secrets.token_hex(6)
        self.client = open_client(options.redis_url)
        settings = StoreSettings(
            prefix=options.prefix,
            history=options.history,
            history_seconds=options.history_seconds,
            limit=RateLimit(options.rate, options.burst),
            presence_ttl=options.presence_ttl,
            session_ttl=options.session_ttl,
            dedupe_window=options.dedupe_window,
        )
        self.store = ChatStore(self.client, settings)
        self.rooms: dict[str, Room] = {}
        self._by_channel: dict[str, Room] = {}
        self._commands: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()
        self._pending: collections.Counter[str] = collections.Counter()
        self._last_seen = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()  # the pub/sub connection is up (for tests and logs)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._subscriber(), name="chat-subscriber"),
            asyncio.create_task(self._presence_loop(), name="chat-presence"),
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._background]:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.client.aclose()

    def member(self, user: str) -> str:
        return f"{user}{MEMBER_SEPARATOR}{self.instance}"

    # ---- admission (interfaces.ChatService) ------------------------------------------------------

    async def admit(self, request: WebSocketRequest) -> tuple[str, list[Header]] | Response:
        return await admit(self.store, request, self.options.session_ttl)

    def attach(self, peer: WsConnectionPeer, user: str) -> ChatSession:
        return ChatSession(self, self.store, peer, user)

    # ---- rooms -------------------------------------------------------------------------------

    def enter(self, name: str, session: RoomMember) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = Room(name, self.store.channel(name))
            self.rooms[name] = room
            self._by_channel[room.channel] = room
            self._commands.put_nowait((True, room.channel))
        if session not in room.members:
            room.members[session] = None
            room.users[session.user] += 1
        return room

    def leave(self, name: str, session: RoomMember) -> bool:
        """Remove ``session`` from room ``name``; True when it was its user's last one here.

        The caller then removes the user's presence (``forget``), now or in the background.
        """
        room = self.rooms.get(name)
        if room is None or session not in room.members:
            return False
        del room.members[session]
        room.users[session.user] -= 1
        last = room.users[session.user] <= 0
        if last:
            del room.users[session.user]
        if not room.members:
            del self.rooms[name]
            del self._by_channel[room.channel]
            self._commands.put_nowait((False, room.channel))
        return last

    async def forget(self, name: str, user: str) -> None:
        """Remove ``user`` (as present through this backend) from the presence of ``name``."""
        await self.store.presence_remove(name, self.member(user))

    def forget_later(self, name: str, user: str) -> None:
        self._spawn(self.forget(name, user))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            try:
                await coro
            except (RedisError, OSError) as exc:
                log.info("chat: background redis call failed: %s", exc)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _deliver(self, room: Room, payload: str) -> None:
        msg_id = proto.message_id(payload)
        if room.last_id is None or msg_id > room.last_id:
            room.last_id = msg_id
        for session in list(room.members):
            session.deliver(room.name, msg_id, payload)

    # ---- pub/sub -----------------------------------------------------------------------------

    async def _subscriber(self) -> None:
        attempt = 0
        rng = random.Random()
        while True:
            pubsub = self.client.pubsub()
            try:
                await self._subscription(pubsub)
            except (RedisError, OSError, TimeoutError) as exc:
                if self.connected.is_set():
                    log.warning("chat: redis subscription lost (%s); reconnecting", exc)
                    attempt = 0
                elif attempt == 0:
                    log.warning("chat: cannot subscribe in redis (%s); retrying", exc)
            finally:
                self.connected.clear()
                for room in self.rooms.values():
                    room.subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            delay = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt) * (0.5 + rng.random() / 2)
            attempt = min(attempt + 1, 10)
            await asyncio.sleep(delay)

    async def _subscription(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        await pubsub.subscribe(f"{self.options.prefix}:chat:hub:{self.instance}")
        self._last_seen = loop.time()
        self._pending.clear()
        while not self._commands.empty():
            self._commands.get_nowait()
        for channel in self._by_channel:
            self._commands.put_nowait((True, channel))
        listener = asyncio.create_task(self._listen(pubsub))
        writer = asyncio.create_task(self._write(pubsub))
        try:
            done, _ = await asyncio.wait({listener, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in (listener, writer):
                task.cancel()
            await asyncio.gather(listener, writer, return_exceptions=True)

    async def _write(self, pubsub: PubSub) -> None:
        """Send (un)subscribe commands in order and PING when idle; give up on silence."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                subscribe, channel = await asyncio.wait_for(self._commands.get(), PING_INTERVAL)
            except TimeoutError:
                if loop.time() - self._last_seen > DEAD_AFTER:
                    raise ConnectionError(
                        "no answer from redis on the pub/sub connection"
                    ) from None
                await pubsub.ping()
                continue
            if subscribe == (channel in self._by_channel):  # skip commands made stale since
                self._pending[channel] += 1
                if subscribe:
                    await pubsub.subscribe(channel)
                else:
                    await pubsub.unsubscribe(channel)

    async def _listen(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await pubsub.get_message(timeout=None)
            self._last_seen = loop.time()
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "message":
                room = self._by_channel.get(channel)
                if room is not None:
                    self._deliver(room, message["data"])
            elif kind == "subscribe":
                await self._confirmed(channel)
            elif kind == "unsubscribe":
                self._pending[channel] -= 1

    async def _confirmed(self, channel: str) -> None:
        if channel.startswith(f"{self.options.prefix}:chat:hub:"):
            self.connected.set()
            return
        self._pending[channel] -= 1
        room = self._by_channel.get(channel)
        if self._pending[channel] > 0 or room is None:
            return  # a later (un)subscribe of this channel is still on its way
        if room.last_id is None:
            view = await self.store.view(room.name, 0, 0)
            room.last_id, room.epoch = view.last, view.epoch
        else:
            await self._catch_up(room)
        room.subscribed.set()

    async def _catch_up(self, room: Room) -> None:
        """Deliver what was stored while this backend was not subscribed to ``room``."""
        assert room.last_id is not None
        view = await self.store.view(room.name, room.last_id, REPLAY_BATCH)
        reason = gap_reason(room.last_id, room.epoch, view)
        if reason is not None:
            oldest = view.entries[0].id if view.entries and reason == TRIMMED else None
            log.warning("chat: room %s lost history while unsubscribed (%s)", room.name, reason)
            event = proto.history_gap(room.name, reason, view.epoch, oldest)
            for session in list(room.members):
                session.gap(room.name, event, restart=reason == EPOCH)
        room.epoch = view.epoch
        if reason == EPOCH:
            room.last_id = 0
            view = await self.store.view(room.name, 0, REPLAY_BATCH)
        entries = view.entries
        while True:
            for entry in entries:
                self._deliver(room, entry.payload)
            if len(entries) < REPLAY_BATCH:
                return
            entries = await self.store.read_after(room.name, entries[-1].id, REPLAY_BATCH)

    # ---- presence ----------------------------------------------------------------------------

    async def _presence_loop(self) -> None:
        interval = self.options.presence_ttl / 3
        while True:
            await asyncio.sleep(interval)
            members = {
                room.name: [self.member(user) for user in room.users]
                for room in self.rooms.values()
            }
            try:
                await self.store.presence_touch(members)
            except (RedisError, OSError) as exc:
                log.info("chat: presence refresh failed: %s", exc)
