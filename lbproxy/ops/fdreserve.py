"""File descriptors kept in reserve for the admin API and the health checks (README
"Admin API security", "File descriptor reserve").

Without a reserve, a full proxy takes every descriptor up to RLIMIT_NOFILE and the
admin API's accept fails too: monitoring goes blind exactly when it matters. So each
lbproxy process refuses new proxied connections (http: 503, tcp: close) while

    open descriptors (estimated) + reserve >= soft RLIMIT_NOFILE

and the reserve (admin.max_connections + the admin's refusals + one per health-checked
backend + a margin) stays free for /metrics, the dashboard and the checks.

Counting open descriptors: a scan of /proc/self/fd is exact but costs O(open fds), too
much per accept; the number of an accepted descriptor is no measure either (the kernel
hands out the lowest free number, so one closed early connection makes it small however
many are open). So the estimate is the last scan plus two descriptors (client and
backend socket) for every connection admitted since; closes are not followed, so it only
errs high. When it reaches the threshold a new scan corrects it before anything is
refused, at most once per ``MIN_RESCAN`` and so that scans take at most 1/``SCAN_SHARE``
of the time, or when many connections were admitted since the last scan (its cost per
connection is then small; this keeps a fast churn of short connections from being
refused on an estimate that only grew). Far from the limit a scan is rare, near it a
refusal is decided on a count at most a few tens of milliseconds old.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("lbproxy.ops.fdreserve")

PER_CONNECTION = 2  # a proxied connection holds its client socket and its backend socket
MARGIN = 16  # Redis, name lookups, lingering 503s, what the estimate cannot see
ADMIN_REFUSALS = 4  # admin connections over max_connections that get their 503 at once
MIN_RESCAN = 0.05
SCAN_SHARE = 20  # scans take at most 1/SCAN_SHARE of the time...
SCAN_AMORTIZE = 8  # ...unless 1/SCAN_AMORTIZE as many connections as fds came since the last
MAX_LINGERING = MARGIN // 2  # refused http clients closed after their 503 (not reset)


def reserve_size(admin_max_connections: int, health_checked_backends: int) -> int:
    """Descriptors kept free for the admin API and the health checks."""
    return admin_max_connections + ADMIN_REFUSALS + health_checked_backends + MARGIN


def count_open_fds() -> int:
    """Descriptors open in this process right now (an O(n) scan); -1 when unknown."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path)) - 1  # (minus the one listdir used)
        except OSError:
            continue
    return -1


def soft_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


@dataclass(slots=True)
class FdBudget:
    """The decision: may one more connection be admitted with this many fds open?"""

    limit: int
    reserve: int

    def admits(self, open_fds: int) -> bool:
        return open_fds + self.reserve < self.limit

    def fits(self, reserve: int) -> bool:
        """This reserve leaves the proxy at least as many descriptors as it keeps."""
        return self.limit >= 2 * reserve


class FdReserve:
    """One per process, shared by its listeners: admits or refuses new client connections."""

    __slots__ = (
        "_clock",
        "_count",
        "_reserve",
        "base",
        "budget",
        "lingering",
        "next_scan",
        "since",
    )

    def __init__(
        self,
        limit: int,
        reserve: Callable[[], int],
        *,
        count: Callable[[], int] = count_open_fds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count = count
        self._clock = clock
        self._reserve = reserve
        self.budget = FdBudget(limit, reserve())
        self.base = 0  # open fds at the last scan
        self.since = 0  # connections admitted since
        self.next_scan = 0.0
        self.lingering = 0  # refused connections still open (Refusal protocols)
        self.refresh()

    def refresh(self) -> None:
        """Scan: the exact count of open fds, and the reserve recomputed."""
        started = self._clock()
        self.base = self._count()
        self.since = 0
        # (never more than half the limit: many discovered backends must not starve the proxy)
        self.budget.reserve = min(self._reserve(), self.budget.limit // 2)
        now = self._clock()
        self.next_scan = now + max(MIN_RESCAN, (now - started) * SCAN_SHARE)

    def estimate(self) -> int:
        return self.base + self.since * PER_CONNECTION

    def admit(self) -> bool:
        """For a connection just accepted: True to serve it, False to refuse it."""
        budget = self.budget  # (FdBudget.admits and estimate() inlined: once per accept)
        if self.base + (self.since + 1) * PER_CONNECTION + budget.reserve >= budget.limit:
            if self.since * SCAN_AMORTIZE < self.base and self._clock() < self.next_scan:
                return False
            self.refresh()  # (the scan already sees this connection's client socket)
            if not self.budget.admits(self.base + 1):
                return False
        self.since += 1
        return True


def create(reserve: Callable[[], int]) -> FdReserve | None:
    """The process's reserve, or None (logged) when there is no usable limit to keep it under."""
    limit = soft_limit()
    if limit < 0 or count_open_fds() < 0:
        log.info("no file descriptor limit to keep a reserve under")
        return None
    fds = FdReserve(limit, reserve)
    wanted = reserve()
    if not fds.budget.fits(wanted):
        log.warning(
            "file descriptor limit %d is too low to keep %d in reserve for the admin API and "
            "health checks: no reserve (raise it with ulimit -n / LimitNOFILE)",
            limit,
            wanted,
        )
        return None
    log.info(
        "file descriptors: limit %d, %d kept for the admin API and health checks",
        limit,
        fds.budget.reserve,
    )
    return fds
