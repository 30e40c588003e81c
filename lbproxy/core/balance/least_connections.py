"""Weighted least connections with rotating tie-breaks."""

from __future__ import annotations

from collections.abc import Sequence

TINY_WEIGHT = 1e-9
"""Stand-in for a weight <= 0 (or NaN): such a candidate wins only if all others are as bad."""


def _positive(weight: float) -> float:
    return weight if weight > 0 else TINY_WEIGHT


def least_connections(active: Sequence[int], weights: Sequence[float], start: int) -> int:
    """Index of the candidate minimising ``(active + 1) / weight``.

    Ratios are compared by cross-multiplication, so equal loads on equal weights tie
    exactly. Among the ``k`` tied candidates (in list order) the ``start % k``-th wins, so a
    caller that advances ``start`` on every pick spreads equal candidates evenly, even when
    untied candidates sit between them.
    """
    count = len(active)
    if count == 0:
        raise ValueError("least_connections needs at least one candidate")
    if len(weights) != count:
        raise ValueError(f"{count} active counts but {len(weights)} weights")
    best_load = active[0] + 1
    best_weight = _positive(weights[0])
    tied = [0]
    for index in range(1, count):
        load = active[index] + 1
        weight = _positive(weights[index])
        # Compare load / weight with best_load / best_weight without dividing.
        candidate = load * best_weight
        incumbent = best_load * weight
        if candidate < incumbent:
            best_load, best_weight = load, weight
            tied = [index]
        elif candidate == incumbent:
            tied.append(index)
    return tied[start % len(tied)]
