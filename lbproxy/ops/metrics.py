"""Prometheus metrics: one custom collector on an injected registry.

The proxy only bumps plain integers in ``Stats`` and ``Backend``; this collector
reads them (and the live pools) at scrape time, so a scrape costs O(backends)
and nothing in the hot path touches prometheus_client. Pools and listener
counts are callables so the application can swap pools on reload.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from lbproxy.core.pool import BackendState, Pool
from lbproxy.ops.stats import BackendKey, Histogram, Stats, Totals

LabelValues = TypeVar("LabelValues", bound=tuple[str, ...])


class RegistryStatus(Protocol):
    connected: bool
    last_sync: float  # time.monotonic() of the last full sync, 0.0 = never


# (name, help, labels, the Stats attribute): the counters read as they are, keyed by label values
_COUNTERS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "lbproxy_bytes_total",
        "Bytes proxied; direction in = client to backend, out = backend to client.",
        ("pool", "backend", "direction"),
        "bytes",
    ),
    (
        "lbproxy_upstream_errors_total",
        "Failures talking to a backend, by reason.",
        ("pool", "backend", "reason"),
        "upstream_errors",
    ),
    (
        "lbproxy_rejected_total",
        "Client connections or requests rejected by lbproxy, by reason.",
        ("listener", "reason"),
        "rejected",
    ),
    (
        "lbproxy_requests_total",
        "Requests or connections handed to a backend.",
        ("pool", "backend"),
        "requests",
    ),
    (
        "lbproxy_ws_messages_total",
        "Websocket data messages, counted at their final frame; direction as for bytes.",
        ("pool", "backend", "direction"),
        "ws_messages",
    ),
    (
        "lbproxy_ws_closes_total",
        "Websockets closed, by reason (dead_peer, message_too_big, message_rate, drain, "
        "client, backend).",
        ("pool", "reason"),
        "ws_closes",
    ),
    (
        "lbproxy_rebalance_closes_total",
        "Websockets closed (1001) to rebalance a pool, by the backend they left.",
        ("pool", "backend"),
        "rebalance_closes",
    ),
    (
        "lbproxy_health_checks_total",
        "Active health checks run, by result (pass, fail).",
        ("pool", "backend", "result"),
        "health_checks",
    ),
)


class LbproxyCollector:
    """Reads pools, stats, listener and registry state when Prometheus scrapes."""

    def __init__(
        self,
        pools: Callable[[], Mapping[str, Pool]],
        stats: Stats | Callable[[], Stats],
        listeners: Callable[[], Mapping[str, int]],
        registry_status: RegistryStatus | None = None,
        native: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._pools = pools
        self._stats_of = stats  # --workers N: the sum over the workers, read per scrape
        self._stats = stats if isinstance(stats, Stats) else Stats()
        self._listeners = listeners
        self._registry_status = registry_status
        self._native = native

    def collect(self) -> Iterator[Metric]:
        if not isinstance(self._stats_of, Stats):
            self._stats = self._stats_of()
        yield from self._backend_metrics()
        yield from self._counter_metrics()
        yield _histogram(
            "lbproxy_handshake_seconds",
            "Time from accepting a client to the backend connection being ready.",
            self._stats.handshake_seconds,
        )
        yield _histogram(
            "lbproxy_health_check_seconds",
            "Duration of active health checks.",
            self._stats.health_check_seconds,
        )
        listening = GaugeMetricFamily(
            "lbproxy_listener_connections",
            "Client connections currently open on a listener.",
            labels=["listener"],
        )
        for name, count in sorted(self._listeners().items()):
            listening.add_metric([name], count)
        yield listening
        if self._native is not None:
            native = GaugeMetricFamily(
                "lbproxy_listener_native_tunnels",
                "Tunnels of a listener forwarded by the native engine (the rest run in Python).",
                labels=["listener"],
            )
            for name, count in sorted(self._native().items()):
                native.add_metric([name], count)
            yield native
        yield from self._registry_metrics()

    def _backend_metrics(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "lbproxy_connections_active",
            "Open proxied connections per backend.",
            labels=["pool", "backend"],
        )
        up = GaugeMetricFamily(
            "lbproxy_backend_up", "1 if the backend is up, else 0.", labels=["pool", "backend"]
        )
        state = GaugeMetricFamily(
            "lbproxy_backend_state",
            "1 for the backend's current state (up, down, draining), 0 for the others.",
            labels=["pool", "backend", "state"],
        )
        for pool_name, pool in sorted(self._pools().items()):
            for backend_id, backend in sorted(pool.backends.items()):
                labels = [pool_name, backend_id]
                active.add_metric(labels, pool.active(backend))
                up.add_metric(labels, 1 if backend.state is BackendState.UP else 0)
                for each in BackendState:
                    state.add_metric([*labels, each.value], 1 if backend.state is each else 0)
        yield from (active, up, state)

    def _counter_metrics(self) -> Iterator[Metric]:
        stats = self._stats
        yield _counter(
            "lbproxy_connections_total",
            "Client connections accepted per listener.",
            ["listener"],
            {(name,): n for name, n in stats.connections_total.items()},
        )
        for name, text, labels, attr in _COUNTERS:
            yield _counter(name, text, list(labels), getattr(stats, attr))
        if stats.limits_redis_up is not None:
            yield GaugeMetricFamily(
                "lbproxy_limits_redis_up",
                "1 while the shared admission limits (scope redis) reach Redis; 0: failing open.",
                value=stats.limits_redis_up,
            )

    def _registry_metrics(self) -> Iterator[Metric]:
        status = self._registry_status
        if status is None:
            return
        yield GaugeMetricFamily(
            "lbproxy_registry_up",
            "1 while connected to the Redis registry.",
            value=1 if status.connected else 0,
        )
        age = time.monotonic() - status.last_sync if status.last_sync > 0 else math.inf
        yield GaugeMetricFamily(
            "lbproxy_registry_last_sync_age_seconds",
            "Seconds since the last full sync with the Redis registry (+Inf = never).",
            value=age,
        )


def _counter(
    name: str, documentation: str, labels: list[str], values: Mapping[LabelValues, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], histogram.cumulative(), sum_value=histogram.total)
    return family


def backend_totals(pools: Mapping[str, Pool], stats: Stats) -> dict[BackendKey, Totals]:
    """Every backend's open connections and cumulative bytes in/out and requests (History)."""
    totals: dict[BackendKey, Totals] = {}
    counted = stats.bytes
    requests = stats.requests
    for pool_name, pool in pools.items():
        for backend_id, backend in pool.backends.items():
            totals[(pool_name, backend_id)] = (
                pool.active(backend),
                counted.get((pool_name, backend_id, "in"), 0),
                counted.get((pool_name, backend_id, "out"), 0),
                requests.get((pool_name, backend_id), 0),
            )
    return totals


def build_registry(
    pools: Callable[[], Mapping[str, Pool]],
    stats: Stats | Callable[[], Stats],
    listeners: Callable[[], Mapping[str, int]],
    registry_status: RegistryStatus | None = None,
    native: Callable[[], Mapping[str, int]] | None = None,
) -> CollectorRegistry:
    """A new registry (never the global one) holding the lbproxy collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LbproxyCollector(pools, stats, listeners, registry_status, native))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
