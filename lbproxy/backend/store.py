"""The chat's Redis layout and operations: rooms, dedupe, rate limits, presence, sessions.

Keys (``P`` = prefix, ``R`` = room, ``U`` = user):

- ``P:chat:room:R:stream``: the room's history, a stream with entry ids ``<msg id>-0`` and fields
  ``m`` (the msg JSON) and ``p`` (the id of the message before it, to detect trimmed history);
  trimmed (exactly) to the last ``history_max`` entries and to ``history_seconds`` by id
  (ids are at least the Redis time in microseconds when stored: ``XTRIM MINID``).
- ``P:chat:room:R:meta``: hash with ``epoch`` (random, set once by the first join or send of
  the room: a new epoch means Redis lost the room's data) and ``last`` (the newest id stored,
  kept when trimming empties the stream).
- ``P:chat:room:R`` (pub/sub channel): every stored msg JSON, published by the same script.
- ``P:chat:room:R:presence``: sorted set of ``U\\n<backend instance>`` scored by expiry (ms).
- ``P:chat:dedupe:<sha256 of [R, U, client_msg_id]>``: the stored msg JSON, for the dedupe window.
- ``P:chat:rate:U``: GCRA state (see ratelimit.py). ``P:chat:session:<id>``: the session's user.

Message ids are ``max(previous id + 1, Redis time in microseconds)``: they increase within a
room, and still do after Redis lost its data (a restart without persistence), so clients that
resume with ``since`` neither miss nor re-number anything new.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from lbproxy.backend.chat_protocol import Send, message_parts
from lbproxy.backend.ratelimit import GCRA_LUA, MICROS, RateLimit

# KEYS: dedupe, rate, stream, meta. ARGV: dedupe ttl ms, interval us, tolerance us, maxlen,
# channel, msg head, msg tail, history us, new epoch. One atomic step: dedupe check, rate
# limit, new id, XADD, trim by count and time, remember, PUBLISH.
SEND_LUA = (
    """
local dup = redis.call('GET', KEYS[1])
if dup then return {'dup', dup} end
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000000 + tonumber(t[2])
local KEY_RATE = KEYS[2]
local INTERVAL = tonumber(ARGV[2])
local TOLERANCE = tonumber(ARGV[3])
"""
    + GCRA_LUA
    + """
local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local prev = tonumber(redis.call('HGET', KEYS[4], 'last') or '0')
if #top > 0 then
  local newest = tonumber(string.match(top[1][1], '^(%d+)'))
  if newest > prev then prev = newest end
end
local id = prev + 1
if NOW > id then id = NOW end
local ids = string.format('%d', id)
local msg = ARGV[6] .. ids .. ARGV[7]
local prevs = string.format('%d', prev)
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[4], ids .. '-0', 'm', msg, 'p', prevs)
local oldest = NOW - tonumber(ARGV[8])
if oldest > 0 then redis.call('XTRIM', KEYS[3], 'MINID', string.format('%d', oldest)) end
redis.call('HSETNX', KEYS[4], 'epoch', ARGV[9])
redis.call('HSET', KEYS[4], 'last', ids)
redis.call('SET', KEYS[1], msg, 'PX', ARGV[1])
redis.call('PUBLISH', ARGV[5], msg)
return {'ok', msg}
"""
)

# KEYS: presence zsets. ARGV: ttl ms, then per key: member count, members (expiry from the
# Redis clock, so backends with skewed clocks agree).
PRESENCE_TOUCH_LUA = """
local t = redis.call('TIME')
local ttl = tonumber(ARGV[1])
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for j = 1, n do
    redis.call('ZADD', KEYS[k], expiry, ARGV[i])
    i = i + 1
  end
  redis.call('PEXPIRE', KEYS[k], 2 * ttl)
end
return #KEYS
"""

# KEYS: presence zset. Drops expired members and returns the live ones.
PRESENCE_LIST_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

MEMBER_SEPARATOR = "\n"  # names never contain control characters


@dataclass(frozen=True, slots=True)
class Stored:
    payload: str  # the msg JSON, as published


@dataclass(frozen=True, slots=True)
class Duplicate:
    payload: str  # the msg JSON stored by the first send with this client_msg_id


@dataclass(frozen=True, slots=True)
class Limited:
    retry_after: float  # seconds


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    prev: int  # id of the message before this one when it was stored (0: none)
    payload: str


@dataclass(frozen=True, slots=True)
class View:
    """One consistent read of a room: its epoch, newest id stored, and entries after an id."""

    epoch: str
    last: int  # newest id ever stored in this epoch (0: none)
    entries: list[Entry]


@dataclass(frozen=True, slots=True)
class StoreSettings:
    prefix: str
    history: int  # at most this many messages per room
    limit: RateLimit
    presence_ttl: float
    session_ttl: float
    dedupe_window: float
    history_seconds: float = 300.0  # and none older than this


def new_epoch() -> str:
    return secrets.token_hex(8)


def _entry(raw: Any) -> Entry:
    entry_id, fields = raw
    return Entry(int(str(entry_id).split("-", 1)[0]), int(fields.get("p", "0")), str(fields["m"]))


class ChatStore:
    """All chat state operations against one Redis (a redis.asyncio client, decoded strings)."""

    def __init__(self, client: Redis, settings: StoreSettings) -> None:
        self.client = client
        self.settings = settings
        self._send = client.register_script(SEND_LUA)
        self._touch = client.register_script(PRESENCE_TOUCH_LUA)
        self._list = client.register_script(PRESENCE_LIST_LUA)

    def channel(self, room: str) -> str:
        return f"{self.settings.prefix}:chat:room:{room}"

    def stream_key(self, room: str) -> str:
        return f"{self.channel(room)}:stream"

    def meta_key(self, room: str) -> str:
        return f"{self.channel(room)}:meta"

    def presence_key(self, room: str) -> str:
        return f"{self.channel(room)}:presence"

    def dedupe_key(self, room: str, user: str, client_msg_id: str) -> str:
        digest = hashlib.sha256(json.dumps([room, user, client_msg_id]).encode()).hexdigest()
        return f"{self.settings.prefix}:chat:dedupe:{digest}"

    def rate_key(self, user: str) -> str:
        return f"{self.settings.prefix}:chat:rate:{user}"

    def session_key(self, session_id: str) -> str:
        return f"{self.settings.prefix}:chat:session:{session_id}"

    async def send(self, room: str, user: str, send: Send) -> Stored | Duplicate | Limited:
        head, tail = message_parts(room, user, send)
        s = self.settings
        keys = [
            self.dedupe_key(room, user, send.client_msg_id),
            self.rate_key(user),
            self.stream_key(room),
            self.meta_key(room),
        ]
        args: list[Any] = [
            int(s.dedupe_window * 1000),
            s.limit.interval_us,
            s.limit.tolerance_us,
            s.history,
            self.channel(room),
            head,
            tail,
            int(s.history_seconds * MICROS),
            new_epoch(),
        ]
        kind, value = await self._send(keys=keys, args=args)
        if kind == "ok":
            return Stored(value)
        if kind == "dup":
            return Duplicate(value)
        return Limited(int(value) / MICROS)

    async def view(self, room: str, after: int, count: int) -> View:
        """The room's epoch (made now if it has none) and last id, and up to ``count`` entries
        after ``after``, read atomically (MULTI/EXEC)."""
        meta = self.meta_key(room)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hsetnx(meta, "epoch", new_epoch())
            pipe.hmget(meta, ["epoch", "last"])
            pipe.xrevrange(self.stream_key(room), count=1)
            if count > 0:
                pipe.xrange(self.stream_key(room), min=f"{after}-1", count=count)
            replies = await pipe.execute()
        epoch, last = replies[1]
        top = replies[2]
        newest = _entry(top[0]).id if top else 0
        entries = [_entry(item) for item in replies[3] or ()] if count > 0 else []
        return View(str(epoch), max(int(last or 0), newest), entries)

    async def read_after(self, room: str, after: int, count: int) -> list[Entry]:
        """Up to ``count`` stored messages with ids greater than ``after``, oldest first."""
        raw = await self.client.xrange(self.stream_key(room), min=f"{after}-1", count=count)
        return [_entry(item) for item in raw or ()]

    async def presence_touch(self, members: dict[str, list[str]]) -> None:
        """Mark ``members`` (room -> members) present for another ``presence_ttl``."""
        keys: list[str] = []
        args: list[Any] = [int(self.settings.presence_ttl * 1000)]
        for room, names in members.items():
            if names:
                keys.append(self.presence_key(room))
                args += [len(names), *names]
        if keys:
            await self._touch(keys=keys, args=args)

    async def presence_remove(self, room: str, member: str) -> None:
        await self.client.zrem(self.presence_key(room), member)

    async def presence_list(self, room: str) -> list[str]:
        """Sorted names of the users present in ``room`` on any backend."""
        members = await self._list(keys=[self.presence_key(room)])
        return sorted({str(m).split(MEMBER_SEPARATOR, 1)[0] for m in members})

    async def session_user(self, session_id: str) -> str | None:
        value = await self.client.get(self.session_key(session_id))
        return None if value is None else str(value)

    async def save_session(self, session_id: str, user: str) -> None:
        ttl = max(1, int(self.settings.session_ttl))
        await self.client.set(self.session_key(session_id), user, ex=ttl)
