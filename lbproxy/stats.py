"""Plain counters the proxy updates off the per-chunk path; metrics.py exposes them.

Nothing here touches prometheus_client: the proxy bumps ints, and a custom
collector reads them at scrape time, so a scrape costs O(backends) and a
connection costs a few integer additions.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict

HANDSHAKE_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Cumulative-at-scrape histogram: per-bucket counts, a sum and a count."""

    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self, buckets: tuple[float, ...] = HANDSHAKE_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last slot is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class Stats:
    """All counters of one lbproxy process (one per worker)."""

    def __init__(self) -> None:
        # listener -> accepted connections
        self.connections_total: defaultdict[str, int] = defaultdict(int)
        # (listener, reason) -> rejected connections/requests (reason: 400, 408, 431, 503, ...)
        self.rejected: defaultdict[tuple[str, str], int] = defaultdict(int)
        # (pool, backend, direction) -> bytes; direction "in" = client->backend, "out" = back
        self.bytes: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        # (pool, backend, reason) -> upstream errors (connect_refused, connect_timeout, ...)
        self.upstream_errors: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        # (pool, backend) -> proxied requests/connections handed to the backend
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.handshake_seconds = Histogram()
        # (pool, backend, result) -> health checks run; result "pass" | "fail"
        self.health_checks: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.health_check_seconds = Histogram()
