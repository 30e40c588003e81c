"""Smooth weighted round-robin (the algorithm of NGINX's upstream module).

Each pick adds every candidate's weight to its ``current`` value, chooses the largest
(first in list order on ties) and subtracts the total weight from the chosen one. Over
any ``sum(weights)`` consecutive picks of a fixed set every candidate is chosen exactly
``weight`` times, and heavy candidates are interleaved with light ones rather than
bunched: weights a=5, b=1, c=1 give ``a a b a c a a``.
"""

from __future__ import annotations

from collections.abc import Sequence


class SmoothRoundRobin:
    """Per-id ``current`` values kept between picks; the id set may change at any pick."""

    __slots__ = ("_current", "_ids")

    def __init__(self) -> None:
        self._current: dict[str, int] = {}
        self._ids: tuple[str, ...] = ()

    def _reconcile(self, ids: tuple[str, ...]) -> None:
        """Drop state of ids that vanished; new ids start at 0; survivors keep theirs."""
        if len(set(ids)) != len(ids):
            raise ValueError("SmoothRoundRobin.pick: duplicate ids")
        old = self._current
        self._current = {ident: old.get(ident, 0) for ident in ids}
        self._ids = ids

    def pick(self, ids: Sequence[str], weights: Sequence[int]) -> int:
        """Index into ``ids`` of the next pick.

        Weights <= 0 are never picked while some weight is positive; if none is, all
        candidates are treated as weight 1.
        """
        count = len(ids)
        if count == 0:
            raise ValueError("SmoothRoundRobin.pick needs at least one candidate")
        if len(weights) != count:
            raise ValueError(f"{count} ids but {len(weights)} weights")
        key = tuple(ids)
        if key != self._ids:
            self._reconcile(key)
        effective = [weight if weight > 0 else 0 for weight in weights]
        total = sum(effective)
        if total == 0:
            effective = [1] * count
            total = count
        current = self._current
        best = 0
        best_value = 0
        for index, ident in enumerate(key):
            value = current[ident] + effective[index]
            current[ident] = value
            if index == 0 or value > best_value:
                best, best_value = index, value
        current[key[best]] = best_value - total
        return best
