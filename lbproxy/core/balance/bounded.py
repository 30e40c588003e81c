"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018).

Every backend gets a capacity ``c = ceil(factor * (total + 1) / n)`` where ``total`` is
the number of connections already open and ``n`` the number of backends; a new
connection goes to the first backend in its key's preference order (the ring walk) that
is below capacity. No backend ever exceeds ``factor`` times the average (rounded up),
while keys whose owner has room keep their owner. The trade: a smaller factor spreads
hot keys more evenly but moves more of them off their owner (weaker affinity); a large
factor is plain consistent hashing. Which keys overflow depends on the current loads, so
two lbproxy instances agree on overflowed keys only when they see the same loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def capacity(active: Mapping[str, int], factor: float) -> float:
    """Per-backend limit for the next connection (``inf`` for an empty set or factor)."""
    members = len(active)
    if members == 0:
        return math.inf
    limit = factor * (sum(active.values()) + 1) / members
    if not math.isfinite(limit):
        return limit
    # round() first: 1.1 * 10 is 11.000000000000002 in binary floating point, not 12.
    return float(math.ceil(round(limit, 9)))


def bounded_choice(preference: Iterable[str], active: Mapping[str, int], factor: float) -> str:
    """First id in ``preference`` with ``active[id] + 1 <= capacity``.

    Ids missing from ``active`` count as 0 connections. When no id qualifies (which the
    bound rules out for ``factor >= 1`` and a preference covering ``active``), the least
    loaded id of the preference is returned, earliest on ties. Raises ``ValueError`` only
    for an empty preference.
    """
    limit = capacity(active, factor)
    best: str | None = None
    best_load = 0
    for ident in preference:
        load = active.get(ident, 0)
        if load + 1 <= limit:
            return ident
        if best is None or load < best_load:
            best, best_load = ident, load
    if best is None:
        raise ValueError("bounded_choice: empty preference")
    return best
