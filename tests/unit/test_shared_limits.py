"""The workers' shared admission table (shared_limits.py): two rows of one memfd, as two
workers of `serve --workers 2` see it."""

from __future__ import annotations

from lbproxy.config.types import LimitsConfig
from lbproxy.core.limits import CONNECTIONS, RATE
from lbproxy.core.shared_counts import ITEM, SharedCounts
from lbproxy.ops.shared_limits import SharedLimits


def _two_workers() -> tuple[SharedCounts, SharedLimits, SharedLimits]:
    counts = SharedCounts.create(rows=2)
    offset = counts.rows * counts.columns * ITEM
    return counts, SharedLimits(counts.fd, offset, 2, 0), SharedLimits(counts.fd, offset, 2, 1)


def test_connections_per_ip_is_the_balancers() -> None:
    counts, w0, w1 = _two_workers()
    config = LimitsConfig(connections_per_ip=3)
    try:
        assert w0.admit("web", "10.0.0.1", 1.0, config).admitted
        assert w1.admit("web", "10.0.0.1", 1.0, config).admitted
        assert w0.admit("web", "10.0.0.1", 1.0, config).admitted
        assert w1.admit("web", "10.0.0.1", 1.0, config).reason == CONNECTIONS
        assert w0.admit("web", "10.0.0.2", 1.0, config).admitted  # another IP
        assert w1.admit("other", "10.0.0.1", 1.0, config).admitted  # another listener
        w0.closed("web", "10.0.0.1")
        assert w1.admit("web", "10.0.0.1", 1.0, config).admitted
        assert w0.admit("web", "10.0.0.1", 1.0, config).reason == CONNECTIONS
    finally:
        w0.close()
        w1.close()
        counts.close()


def test_rate_per_ip_is_the_balancers_and_a_new_worker_zeroes_its_row() -> None:
    counts, w0, w1 = _two_workers()
    config = LimitsConfig(rate_per_ip=1, burst=2)
    try:
        assert w0.admit("web", "a", 5.0, config).admitted
        assert w1.admit("web", "a", 5.0, config).admitted
        refused = w0.admit("web", "a", 5.0, config)
        assert (refused.admitted, refused.reason) == (False, RATE)
        assert w1.admit("web", "a", 6.0, config).admitted  # one interval later
        # worker 1 dies holding connections: its replacement starts from zero
        limit = LimitsConfig(connections_per_ip=1)
        assert w1.admit("web", "b", 7.0, limit).admitted
        assert not w0.admit("web", "b", 7.0, limit).admitted
        replacement = SharedLimits(counts.fd, w1.offset, 2, 1)
        assert w0.admit("web", "b", 7.0, limit).admitted
        replacement.close()
    finally:
        w0.close()
        w1.close()
        counts.close()
