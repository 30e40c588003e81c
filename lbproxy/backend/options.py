"""Options of the reference backend (``lbproxy backend``)."""

from __future__ import annotations

from dataclasses import dataclass

from lbproxy.config.types import Address


@dataclass(frozen=True, slots=True)
class BackendOptions:
    listen: Address
    id: str = ""  # "" means "backend-<port>" (the bound port when listen.port is 0)
    redis_url: str | None = None
    prefix: str = "lbproxy"
    pool: str = "chat"
    advertise: Address | None = None  # address registered in Redis (default: the bound address)
    drain_seconds: float = 10.0  # on SIGTERM: how long clients get before the 1001 close
    ttl: float = 6.0  # registration TTL
    # chat (README "The reference chat backend"); all shared through Redis
    max_message: int = 64 * 1024  # longest chat message (bytes); longer ones get bad_request
    history: int = 100_000  # messages kept per room at most (--history-max)
    rate: float = 20.0  # sends per second per user, across all backends
    burst: int = 40  # sends allowed at once before rate limiting starts
    presence_ttl: float = 6.0  # a user vanishes from presence this long after its backend died
    session_ttl: float = 86400.0  # lifetime of the session cookie and its Redis mapping
    dedupe_window: float = 600.0  # a client_msg_id is remembered this long per (room, user)
    history_seconds: float = 300.0  # and for this long at most (--history-seconds)
