"""Which websockets to close to rebalance a pool (pure: values in, values out; README
"Rebalancing").

Least-connections pools: a backend holding more than ``max_imbalance`` x its weighted share
of the pool's connections has an excess; closing that many of its websockets (newest
first) lets their reconnects land on emptier backends. With several holders of a backend's
connections (instances of a cluster, workers of a balancer) each closes its own share of
the excess. Hash pools: a tunnel whose key's home is now another backend moves (and only
those). Closes are paced by ``Pacer``: at most ``closes_per_second`` in any second (each
holder its part of it: ``holder_rate``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")
EPSILON = 1e-9


def excess(
    loads: Mapping[str, int], weights: Mapping[str, float], max_imbalance: float, total: int
) -> dict[str, int]:
    """backend -> connections above ``max_imbalance`` x its weighted share of ``total``
    (``total``: the pool's connections, those reconnecting counted)."""
    weight_sum = sum(max(weights[b], 0.0) for b in loads)
    if max_imbalance <= 0 or weight_sum <= 0 or len(loads) < 2:
        return {}
    out: dict[str, int] = {}
    for backend, load in loads.items():
        limit = math.floor(
            max_imbalance * total * max(weights[backend], 0.0) / weight_sum + EPSILON
        )
        if load > limit:
            out[backend] = load - limit
    return out


def own_share(excess: int, own: int, load: int) -> int:
    """How many of the ``excess`` connections of a backend this holder closes: its share,
    ``own`` of the ``load`` (rounded up, never more than it holds)."""
    if excess <= 0 or own <= 0 or load <= 0:
        return 0
    return min(own, excess, math.ceil(excess * own / load - EPSILON))


def newest(conns: Sequence[T], count: int) -> list[T]:
    """The ``count`` newest of ``conns`` (oldest first), newest first."""
    return list(reversed(conns[len(conns) - count :])) if count > 0 else []


def moved(
    tunnels: Iterable[tuple[T, str, bytes | None]], home: Mapping[bytes, str | None]
) -> list[T]:
    """The tunnels (conn, backend id, key) whose key's home is now another backend
    (``home``: key -> backend id, None when no backend is up), in the order given."""
    out: list[T] = []
    for conn, backend, key in tunnels:
        if key is None:
            continue
        there = home.get(key)
        if there is not None and there != backend:
            out.append(conn)
    return out


class Pacer:
    """Evenly spaced events: the next one at least ``1 / rate`` after the last, ``rate``
    given with each event (so at most ``rate`` in any second while it holds)."""

    __slots__ = ("next",)

    def __init__(self) -> None:
        self.next = -math.inf

    def wait(self, now: float) -> float:
        """Seconds until the next event is allowed (0: now)."""
        return max(0.0, self.next - now)

    def took(self, now: float, rate: float) -> float:
        """An event at ``now``; the seconds until the next one may follow."""
        interval = 1.0 / rate
        self.next = now + interval
        return interval


def holder_rate(closes_per_second: float, own: int, load: int) -> float:
    """The close rate of one holder of a backend's connections (an instance, a worker): its
    part ``own / load`` of ``closes_per_second``, so that all holders together stay within
    it (and none closes ahead of counts the others have not published yet)."""
    if load <= 0 or own >= load:
        return closes_per_second
    return closes_per_second * max(own / load, 0.02)


class PeakTotal:
    """The highest pool total seen over the last ``window`` seconds: the connections closed
    for rebalancing count until their reconnects are back (so no more are closed than
    needed)."""

    __slots__ = ("samples", "window")

    def __init__(self, window: float = 3.0) -> None:
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def add(self, now: float, total: int) -> int:
        samples = [(t, n) for t, n in self.samples if now - t < self.window]
        samples.append((now, total))
        self.samples = samples
        return max(n for _, n in samples)
