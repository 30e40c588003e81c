"""The Redis registry layout (docs/registry.md), its Lua scripts, and pure parsing helpers.

Nothing here does I/O: keys are computed, replies are parsed into frozen values, URLs are
redacted. register.py (registration) and watcher.py (discovery) do the talking.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from lbproxy import addresses
from lbproxy.config.types import MAX_WEIGHT, Address, IPNetwork
from lbproxy.errors import RegistryError

NO_HASH = "no backend hash"
EXPIRED_LINGER = 60.0  # an expired member whose hash never expires is removed after this
STATES = ("up", "draining")
EVENTS = ("join", "change", "drain", "leave")
META_PREFIX = "meta:"
SUPPORTED_SCHEMES = ("redis", "rediss", "unix")
_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces, 1..200 chars


def members_key(prefix: str, pool: str) -> str:
    """Sorted set of the pool's backend ids, scored by expiry (unix seconds, server clock)."""
    return f"{prefix}:pool:{pool}:members"


def backend_key(prefix: str, pool: str, backend_id: str) -> str:
    """Hash describing one backend: id, address, weight, state, instance, meta:*."""
    return f"{prefix}:pool:{pool}:backend:{backend_id}"


def events_channel(prefix: str) -> str:
    """Pub/sub channel carrying {"event", "pool", "id"} JSON on join/change/drain/leave."""
    return f"{prefix}:events"


# KEYS: members, backend hash. ARGV: id, address, weight, state, ttl, channel, pool,
# instance, then meta field/value pairs. Expiry uses the server clock; the event is derived
# from what was there before, so a heartbeat that recreates a lost entry announces a join.
HEARTBEAT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[5])
local expiry = now + ttl
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
local prev = redis.call('HMGET', KEYS[2], 'address', 'weight', 'state')
local event = false
if (not old) or tonumber(old) <= now or (not prev[1]) then
  event = 'join'
elseif prev[3] ~= ARGV[4] and ARGV[4] == 'draining' then
  event = 'drain'
elseif prev[1] ~= ARGV[2] or prev[2] ~= ARGV[3] or prev[3] ~= ARGV[4] then
  event = 'change'
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'address', ARGV[2], 'weight', ARGV[3],
  'state', ARGV[4], 'instance', ARGV[8])
for i = 9, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl * 2000))
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
if event then
  redis.call('PUBLISH', ARGV[6], cjson.encode({event = event, pool = ARGV[7], id = ARGV[1]}))
end
return event or ''
"""

# KEYS: members, backend hash. ARGV: id, instance, channel, pool. Does nothing (returns 0)
# when the hash now belongs to another instance that registered the same id.
DEREGISTER_SCRIPT = """
local owner = redis.call('HGET', KEYS[2], 'instance')
if owner and owner ~= '' and ARGV[2] ~= '' and owner ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({event = 'leave', pool = ARGV[4], id = ARGV[1]}))
return 1
"""

# KEYS: members. ARGV: backend hash key prefix ("{prefix}:pool:{pool}:backend:"), linger.
# Returns {sec, usec, {expired id, score, ...}, id1, score1, {hash1...}, id2, ...}. A member
# whose score passed stays in the set (reported as expired) while its hash lives (about one
# TTL more), so every watcher sees the expiry itself, not a member that merely vanished.
SNAPSHOT_SCRIPT = """
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.rep('0', 6 - #t[2]) .. t[2]
local oldest = tonumber(t[1]) - tonumber(ARGV[2])
local passed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES')
local expired = {}
for i = 1, #passed, 2 do
  local id = passed[i]
  if tonumber(passed[i + 1]) < oldest or #redis.call('HGETALL', ARGV[1] .. id) == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    expired[#expired + 1] = id
    expired[#expired + 1] = passed[i + 1]
  end
end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
local out = {t[1], t[2], expired}
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = live[i + 1]
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. live[i])
end
return out
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One live registration as read from Redis."""

    id: str
    address: Address
    weight: int
    draining: bool
    expiry: float  # unix seconds on the Redis server's clock
    meta: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A pool's registrations at ``server_time``: valid entries and rejected ones."""

    server_time: float
    entries: tuple[Entry, ...]
    malformed: tuple[tuple[str, str], ...]  # (id, why)
    expired: tuple[tuple[str, float], ...] = ()  # (id, score): in the set, score passed


def parse_address(text: str) -> Address:
    """A registered backend's "host:port" or "[v6]:port" (port 1-65535); ValueError if not."""
    return addresses.parse_address(text, port_zero=False)


def check_id(value: str, what: str = "id") -> str:
    if not _ID_RE.match(value):
        raise ValueError(f"bad {what} {value!r}: 1-200 printable ASCII characters, no spaces")
    return value


def parse_weight(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_WEIGHT:
        raise ValueError(f"bad weight {text!r}: an integer 1-{MAX_WEIGHT}")
    return int(text)


def parse_entry(member: str, score: float, fields: Mapping[str, str]) -> Entry:
    """Validate one registration hash; raise ValueError saying what is wrong."""
    check_id(member)
    if fields.get("id", member) != member:
        raise ValueError(f"hash id {fields['id']!r} does not match member {member!r}")
    if "address" not in fields:
        raise ValueError("no address field")
    address = parse_address(fields["address"])
    weight = parse_weight(fields.get("weight", "1"))
    state = fields.get("state", "up")
    if state not in STATES:
        raise ValueError(f"bad state {state!r}: 'up' or 'draining'")
    meta = tuple(
        sorted((k[len(META_PREFIX) :], v) for k, v in fields.items() if k.startswith(META_PREFIX))
    )
    return Entry(member, address, weight, state == "draining", score, meta)


def _pairs(flat: Sequence[object]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def parse_snapshot(reply: Sequence[object]) -> Snapshot:
    """Parse SNAPSHOT_SCRIPT's reply (decoded strings; the expired list may be absent)."""
    server_time = int(str(reply[0])) + int(str(reply[1])) / 1_000_000
    entries: list[Entry] = []
    malformed: list[tuple[str, str]] = []
    start, expired = 2, _expired(reply)
    if len(reply) > 2 and isinstance(reply[2], list | tuple):
        start = 3
    for i in range(start, len(reply) - 2, 3):
        member, score, flat = str(reply[i]), float(str(reply[i + 1])), reply[i + 2]
        if not isinstance(flat, list | tuple) or not flat:
            malformed.append((member, NO_HASH))
            continue
        try:
            entries.append(parse_entry(member, score, _pairs(flat)))
        except ValueError as exc:
            malformed.append((member, str(exc)))
    return Snapshot(server_time, tuple(entries), tuple(malformed), expired)


def _expired(reply: Sequence[object]) -> tuple[tuple[str, float], ...]:
    flat = reply[2] if len(reply) > 2 else None
    if not isinstance(flat, list | tuple):
        return ()
    return tuple((str(flat[i]), float(str(flat[i + 1]))) for i in range(0, len(flat) - 1, 2))


def address_allowed(address: Address, networks: Iterable[IPNetwork]) -> bool:
    """True when ``address`` is an IP literal inside one of ``networks`` (any when empty)."""
    nets = tuple(networks)
    if not nets:
        return True
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return False  # hostnames are never resolved
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in nets)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_localhost(host: str) -> bool:
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def _reaches(host: str, bind: str) -> bool:
    """Whether connecting to ``host`` may reach a socket bound to ``bind`` (same port)."""
    ip, bound = _ip(host), _ip(bind)
    local = _is_localhost(host) or (ip is not None and (ip.is_loopback or ip.is_unspecified))
    if bind == "" or (bound is not None and bound.is_unspecified):
        return local  # a wildcard bind: at least loopback and the unspecified address
    if _is_localhost(bind):
        return local
    if _is_localhost(host):
        return bound is not None and bound.is_loopback
    if ip is not None and bound is not None:
        return ip == bound
    return host.lower().rstrip(".") == bind.lower().rstrip(".")


def address_refusal(address: Address, own: Iterable[Address]) -> str | None:
    """Why a registered address is refused whatever allowed_networks says, or None.

    Refused: lbproxy's own listen/admin addresses (a wildcard bind covers loopback and the
    unspecified address on its port), link-local, unspecified and multicast addresses.
    """
    ip = _ip(address.host)
    if ip is not None:
        if ip.is_unspecified:
            return "unspecified address"
        if ip.is_link_local:
            return "link-local address"
        if ip.is_multicast:
            return "multicast address"
    for mine in own:
        if mine.port == address.port and _reaches(address.host, mine.host):
            return f"lbproxy's own address {mine}"
    return None


def parse_event(data: str) -> tuple[str, str, str]:
    """Parse a change-channel message into (event, pool, id); raise ValueError if malformed."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    event, pool, backend_id = obj.get("event"), obj.get("pool"), obj.get("id")
    if not (isinstance(event, str) and isinstance(pool, str) and isinstance(backend_id, str)):
        raise ValueError("event, pool and id must be strings")
    return event, pool, backend_id


def redact_url(url: str) -> str:
    """Hide the password of a Redis URL: redis://user:secret@h:6379/0 -> redis://user:***@h..."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    redacted = url
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        hidden = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
        redacted = redacted.replace(parts.netloc, hidden, 1)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(k.lower() == "password" for k, _ in pairs):
        query = urlencode(
            [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*"
        )
        redacted = redacted.replace("?" + parts.query, "?" + query, 1)
    return redacted


def url_secret(url: str) -> str | None:
    """The password in ``url`` (netloc or ?password=), to scrub it from error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return None
    if password:
        return password
    for key, value in parse_qsl(parts.query):
        if key.lower() == "password" and value:
            return value
    return None


def scrub(text: str, url: str) -> str:
    """``text`` with the URL's password (if any) replaced by ***."""
    secret = url_secret(url)
    return text.replace(secret, "***") if secret and len(secret) >= 3 else text


def check_url(url: str) -> None:
    """Raise RegistryError for a URL scheme lbproxy does not support (Sentinel, Cluster)."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise RegistryError(
            f"unsupported Redis URL {redact_url(url)!r}: use redis://, rediss:// or unix:// "
            "(Sentinel and Cluster are not supported)"
        )


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: half fixed, half random, capped at ``cap``."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)
