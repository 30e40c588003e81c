"""Per-client admission decisions (pure: values in, values out; README "Admission control").

Two limits per client IP: ``connections_per_ip`` (concurrent connections, a counter) and
``rate_per_ip`` + ``burst`` (new connections, GCRA: the theoretical arrival time ``tat`` of
the next allowed connection; one is allowed at ``now`` when ``tat - now <= (burst - 1) *
interval``, and then ``tat`` moves to ``max(tat, now) + interval``). The concurrency check
comes first: a client refused for its open connections spends no rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lbproxy.config.types import LimitsConfig

RATE = "rate_per_ip"
CONNECTIONS = "connections_per_ip"
CONNECTIONS_RETRY_AFTER = 1.0  # (when a connection closes is unknown: ask again in a second)


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    reason: str = ""  # RATE | CONNECTIONS when refused
    retry_after: float = 0.0  # seconds

    def retry_after_header(self) -> tuple[bytes, bytes]:
        """The ``Retry-After`` header of the 429 (whole seconds, at least 1)."""
        return b"Retry-After", str(max(1, math.ceil(self.retry_after))).encode()


ADMIT = Decision(True)


def gcra(tat: float, now: float, rate: float, burst: int) -> tuple[bool, float, float]:
    """(allowed, new tat, retry after) for a new connection at ``now`` (seconds)."""
    interval = 1.0 / rate
    current = max(tat, now)
    over = current - now - interval * (burst - 1)
    if over > 1e-9:
        return False, tat, over
    return True, current + interval, 0.0


class LocalLimits:
    """The limits of one listener in one process: open connections and GCRA state per IP."""

    __slots__ = ("config", "open", "tats")

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.open: dict[str, int] = {}
        self.tats: dict[str, float] = {}

    def admit(self, ip: str, now: float, *, count: bool = True) -> Decision:
        """Decide for a new connection from ``ip``; an admitted one is counted open."""
        config = self.config
        if 0 < config.connections_per_ip <= self.open.get(ip, 0):
            return Decision(False, CONNECTIONS, CONNECTIONS_RETRY_AFTER)
        if config.rate_per_ip > 0:
            allowed, tat, retry = gcra(
                self.tats.get(ip, now), now, config.rate_per_ip, config.burst
            )
            if not allowed:
                return Decision(False, RATE, retry)
            self.tats[ip] = tat
        if count:
            self.opened(ip)
        return ADMIT

    def opened(self, ip: str) -> int:
        """Count one more open connection of ``ip``; the new count."""
        count = self.open[ip] = self.open.get(ip, 0) + 1
        return count

    def closed(self, ip: str) -> int:
        """One connection of ``ip`` closed; the new count (never below 0)."""
        count = self.open.get(ip, 0) - 1
        if count > 0:
            self.open[ip] = count
            return count
        self.open.pop(ip, None)
        return 0

    def expire(self, now: float) -> None:
        """Forget GCRA states that are back to 'never seen' (bounded memory)."""
        stale = [ip for ip, tat in self.tats.items() if tat <= now]
        for ip in stale:
            del self.tats[ip]
