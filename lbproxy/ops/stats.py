"""Plain counters the proxy updates off the per-chunk path; metrics.py exposes them.

Nothing here touches prometheus_client: the proxy bumps ints, and a custom
collector reads them at scrape time, so a scrape costs O(backends) and a
connection costs a few integer additions.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Mapping

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
        # (pool, backend, direction) -> websocket data messages (direction as for bytes)
        self.ws_messages: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        # (pool, reason) -> websockets closed (ws_rules.close_reason)
        self.ws_closes: defaultdict[tuple[str, str], int] = defaultdict(int)
        # (pool, backend) -> websockets closed to rebalance the pool (rebalancer.py)
        self.rebalance_closes: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.limits_redis_up: int | None = None  # scope "redis" limits: 1 reachable, 0 not


HISTORY_POINTS = 300  # five minutes of once-per-second samples
SAMPLE_INTERVAL = 1.0

BackendKey = tuple[str, str]  # (pool, backend)
Totals = tuple[int, int, int, int]  # open connections, bytes in, bytes out, requests (cumulative)
Point = tuple[int, float, float, float]  # open connections, bytes/s in, bytes/s out, requests/s


class History:
    """The last minutes of every backend, one point per sample: what the dashboard draws.

    ``record`` takes the cumulative counters as of a sample and keeps the rates since the
    previous one (a backend seen for the first time starts at rate 0), so a page that
    loads later still gets the whole picture. Bounded: ``size`` samples.
    """

    __slots__ = ("_last", "_samples", "seq")

    def __init__(self, size: int = HISTORY_POINTS) -> None:
        self._samples: deque[tuple[int, float, dict[BackendKey, Point]]] = deque(maxlen=size)
        self._last: tuple[float, Mapping[BackendKey, Totals]] | None = None
        self.seq = 0

    def record(self, now: float, wall: float, totals: Mapping[BackendKey, Totals]) -> None:
        """One sample: ``now`` monotonic seconds, ``wall`` the Unix time to show."""
        last = self._last
        points: dict[BackendKey, Point] = {}
        for key, (active, nin, nout, nreq) in totals.items():
            before = None if last is None else last[1].get(key)
            seconds = 0.0 if last is None else now - last[0]
            if before is None or seconds <= 0:
                points[key] = (active, 0.0, 0.0, 0.0)
                continue
            points[key] = (
                active,
                max(0, nin - before[1]) / seconds,
                max(0, nout - before[2]) / seconds,
                max(0, nreq - before[3]) / seconds,
            )
        self._last = (now, dict(totals))
        self.seq += 1
        self._samples.append((self.seq, wall, points))

    def document(self, since: int = 0) -> dict[str, object]:
        """The samples after ``since`` (a ``seq`` from an earlier document), oldest first."""
        samples = []
        for seq, wall, points in self._samples:
            if seq <= since:
                continue
            backends: dict[str, dict[str, list[float]]] = {}
            for (pool, backend), (active, rin, rout, rreq) in points.items():
                backends.setdefault(pool, {})[backend] = [
                    active,
                    round(rin, 1),
                    round(rout, 1),
                    round(rreq, 2),
                ]
            samples.append({"seq": seq, "t": round(wall, 3), "backends": backends})
        return {
            "interval": SAMPLE_INTERVAL,
            "size": self._samples.maxlen,
            "seq": self.seq,
            "fields": ["active", "bytes_in_per_s", "bytes_out_per_s", "requests_per_s"],
            "samples": samples,
        }
