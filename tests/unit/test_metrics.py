"""The Prometheus collector reads live pools and stats at scrape time."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.config.types import Address, BackendConfig, PoolConfig
from lbproxy.core.pool import Pool
from lbproxy.ops.metrics import build_registry, render
from lbproxy.ops.stats import Stats

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: object) -> tuple[Samples, dict[str, str]]:
    body, content_type = render(registry)  # type: ignore[arg-type]
    assert content_type.startswith("text/plain; version=")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def make_pool(name: str, *ids: str) -> Pool:
    backends = tuple(BackendConfig(i, Address("127.0.0.1", 9000 + n)) for n, i in enumerate(ids))
    return Pool(PoolConfig(name=name, backends=backends))


@dataclass
class FakeRegistryStatus:
    connected: bool
    last_sync: float


def test_metrics_reflect_pools_and_stats() -> None:
    pool = make_pool("chat", "b1", "b2")
    pools = {"chat": pool}
    stats = Stats()
    listeners = {"public": 7}
    registry = build_registry(lambda: pools, stats, lambda: listeners)
    assert registry is not REGISTRY

    pool.backends["b1"].active = 5
    pool.drain("b2")
    stats.connections_total["public"] += 42
    stats.bytes[("chat", "b1", "in")] += 1000
    stats.bytes[("chat", "b1", "out")] += 2500
    stats.upstream_errors[("chat", "b2", "connect_refused")] += 3
    stats.rejected[("public", "503")] += 2
    stats.requests[("chat", "b1")] += 9
    stats.health_checks[("chat", "b1", "pass")] += 4
    stats.health_checks[("chat", "b2", "fail")] += 1
    stats.handshake_seconds.observe(0.003)
    stats.handshake_seconds.observe(0.2)
    stats.health_check_seconds.observe(0.01)

    samples, types = scrape(registry)
    assert value(samples, "lbproxy_connections_active", pool="chat", backend="b1") == 5
    assert value(samples, "lbproxy_connections_active", pool="chat", backend="b2") == 0
    assert value(samples, "lbproxy_connections_total", listener="public") == 42
    assert value(samples, "lbproxy_backend_up", pool="chat", backend="b1") == 1
    assert value(samples, "lbproxy_backend_up", pool="chat", backend="b2") == 0
    state = "lbproxy_backend_state"
    assert value(samples, state, pool="chat", backend="b2", state="draining") == 1
    assert value(samples, state, pool="chat", backend="b2", state="up") == 0
    assert value(samples, state, pool="chat", backend="b2", state="down") == 0
    assert value(samples, state, pool="chat", backend="b1", state="up") == 1
    bytes_total = "lbproxy_bytes_total"
    assert value(samples, bytes_total, pool="chat", backend="b1", direction="in") == 1000
    assert value(samples, bytes_total, pool="chat", backend="b1", direction="out") == 2500
    errors = "lbproxy_upstream_errors_total"
    assert value(samples, errors, pool="chat", backend="b2", reason="connect_refused") == 3
    assert value(samples, "lbproxy_rejected_total", listener="public", reason="503") == 2
    assert value(samples, "lbproxy_requests_total", pool="chat", backend="b1") == 9
    checks = "lbproxy_health_checks_total"
    assert value(samples, checks, pool="chat", backend="b1", result="pass") == 4
    assert value(samples, checks, pool="chat", backend="b2", result="fail") == 1
    assert value(samples, "lbproxy_listener_connections", listener="public") == 7

    assert types["lbproxy_handshake_seconds"] == "histogram"
    assert value(samples, "lbproxy_handshake_seconds_count") == 2
    assert math.isclose(value(samples, "lbproxy_handshake_seconds_sum"), 0.203)
    assert value(samples, "lbproxy_handshake_seconds_bucket", le="0.0025") == 0
    assert value(samples, "lbproxy_handshake_seconds_bucket", le="0.005") == 1
    assert value(samples, "lbproxy_handshake_seconds_bucket", le="0.25") == 2
    assert value(samples, "lbproxy_handshake_seconds_bucket", le="+Inf") == 2
    assert value(samples, "lbproxy_health_check_seconds_count") == 1
    assert types["lbproxy_connections"] == "counter"
    assert types["lbproxy_connections_active"] == "gauge"
    # no registry status given: no registry metrics
    assert not any(name.startswith("lbproxy_registry") for name, _ in samples)


def test_values_are_read_live_and_pools_can_be_swapped() -> None:
    current = {"chat": make_pool("chat", "b1")}
    stats = Stats()
    registry = build_registry(lambda: current, stats, dict)
    samples, _ = scrape(registry)
    assert value(samples, "lbproxy_connections_active", pool="chat", backend="b1") == 0

    current["chat"].backends["b1"].active = 3
    current["chat"].mark_down("b1", "test")
    samples, _ = scrape(registry)
    assert value(samples, "lbproxy_connections_active", pool="chat", backend="b1") == 3
    assert value(samples, "lbproxy_backend_up", pool="chat", backend="b1") == 0
    assert value(samples, "lbproxy_backend_state", pool="chat", backend="b1", state="down") == 1

    current = {"ws": make_pool("ws", "x1", "x2")}  # a reload swaps the pools
    samples, _ = scrape(registry)
    assert ("lbproxy_backend_up", frozenset({("pool", "chat"), ("backend", "b1")})) not in samples
    assert value(samples, "lbproxy_backend_up", pool="ws", backend="x2") == 1


def test_registry_status_metrics() -> None:
    status = FakeRegistryStatus(connected=False, last_sync=0.0)
    registry = build_registry(dict, Stats(), dict, status)
    samples, _ = scrape(registry)
    assert value(samples, "lbproxy_registry_up") == 0
    assert value(samples, "lbproxy_registry_last_sync_age_seconds") == math.inf

    status.connected = True
    status.last_sync = time.monotonic() - 5.0
    samples, _ = scrape(registry)
    assert value(samples, "lbproxy_registry_up") == 1
    assert 5.0 <= value(samples, "lbproxy_registry_last_sync_age_seconds") < 60.0


def test_each_registry_is_independent() -> None:
    one = build_registry(dict, Stats(), lambda: {"a": 1})
    two = build_registry(dict, Stats(), lambda: {"b": 2})
    samples_one, _ = scrape(one)
    samples_two, _ = scrape(two)
    assert value(samples_one, "lbproxy_listener_connections", listener="a") == 1
    assert ("lbproxy_listener_connections", frozenset({("listener", "a")})) not in samples_two
    body, _ = render(REGISTRY)
    assert b"lbproxy_" not in body  # nothing leaked into the global registry
