"""The second-wave tables of the configuration: [listeners.NAME.limits] and
[pools.NAME.rebalance] (read and checked here; load.py assembles them)."""

from __future__ import annotations

import math

from lbproxy.config.reader import Section, show
from lbproxy.config.types import LimitsConfig, RebalanceConfig


def limits(listener: Section) -> LimitsConfig:
    """[listeners.NAME.limits]: burst defaults to rate_per_ip rounded up (at least 1)."""
    d = LimitsConfig()
    table = listener.table("limits")
    if table is None:
        return d
    s = Section(table, listener.key("limits"), listener.problems, _LIMITS_KEYS)
    connections = s.integer("connections_per_ip", d.connections_per_ip, 0)
    rate = s.number("rate_per_ip", d.rate_per_ip, zero_ok=True)
    burst = s.integer("burst", d.burst, 0)
    if "burst" in table and burst > 0 and rate <= 0:
        s.bad("burst", "needs rate_per_ip > 0")
    if rate > 0 and burst == 0:
        burst = max(1, math.ceil(rate))
    return LimitsConfig(
        connections_per_ip=connections,
        rate_per_ip=rate,
        burst=burst,
        scope=s.choice("scope", d.scope, ("local", "redis")),
    )


def rebalance(pool: Section) -> RebalanceConfig:
    d = RebalanceConfig()
    table = pool.table("rebalance")
    if table is None:
        return d
    s = Section(table, pool.key("rebalance"), pool.problems, _REBALANCE_KEYS)
    imbalance = s.number("max_imbalance", d.max_imbalance, zero_ok=True)
    if 0 < imbalance < 1:
        s.bad("max_imbalance", f"must be 0 (off) or >= 1.0, got {show(table['max_imbalance'])}")
    return RebalanceConfig(
        max_imbalance=imbalance,
        closes_per_second=s.number("closes_per_second", d.closes_per_second, zero_ok=False),
    )


_LIMITS_KEYS = frozenset(("connections_per_ip", "rate_per_ip", "burst", "scope"))
_REBALANCE_KEYS = frozenset(("max_imbalance", "closes_per_second"))
