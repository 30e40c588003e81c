"""Per-user rate limiting shared by all backends: GCRA (generic cell rate algorithm).

One value per user lives in Redis: the theoretical arrival time (TAT) of the next send, in
microseconds of the Redis server clock. A send at ``now`` is allowed when
``TAT - now <= (burst - 1) * interval``; it then moves TAT to ``max(TAT, now) + interval``.
So ``burst`` sends pass at once, then one every ``interval = 1 / rate`` seconds, and a refused
sender is told how long to wait (``retry_after``). :func:`gcra` is the reference
implementation; :data:`GCRA_LUA` is the same rule inside the send script (store.py).
"""

from __future__ import annotations

from dataclasses import dataclass

MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float  # sends per second, sustained
    burst: int  # sends allowed at once

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")

    @property
    def interval_us(self) -> int:
        return max(1, round(MICROS / self.rate))

    @property
    def tolerance_us(self) -> int:
        return self.interval_us * (self.burst - 1)


def gcra(tat: int | None, now: int, limit: RateLimit) -> tuple[bool, int, int]:
    """(allowed, new TAT, retry after) for a send at ``now``; all times in microseconds."""
    current = now if tat is None or tat < now else tat
    if current - now > limit.tolerance_us:
        return False, current, current - now - limit.tolerance_us
    return True, current + limit.interval_us, 0


# Lua fragment: expects KEY_RATE (key), NOW, INTERVAL and TOLERANCE (numbers) to be defined;
# returns {'limited', retry_after_us} from the script when the send is refused.
GCRA_LUA = """
local tat = tonumber(redis.call('GET', KEY_RATE) or '0')
if tat < NOW then tat = NOW end
if tat - NOW > TOLERANCE then
  return {'limited', string.format('%d', tat - NOW - TOLERANCE)}
end
local new_tat = tat + INTERVAL
redis.call('SET', KEY_RATE, string.format('%d', new_tat), 'PX',
  string.format('%d', math.floor((new_tat - NOW) / 1000) + 1))
"""
