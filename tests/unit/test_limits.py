"""The pure parts of admission control and rebalancing (limits.py, rebalance.py), and the
configuration of [listeners.NAME.limits] / [pools.NAME.rebalance] / least_connections_scope."""

from __future__ import annotations

from typing import Any

import pytest

from lbproxy.cluster.counts import remote_counts
from lbproxy.cluster.limits_redis import decision_of
from lbproxy.config.load import parse_config
from lbproxy.config.types import LimitsConfig
from lbproxy.core.limits import CONNECTIONS, RATE, LocalLimits, gcra
from lbproxy.core.rebalance import Pacer, PeakTotal, excess, holder_rate, moved, newest, own_share
from lbproxy.errors import ConfigError


def test_gcra_allows_a_burst_then_one_per_interval() -> None:
    tat, allowed = 0.0, []
    for _ in range(7):
        ok, tat_next, retry = gcra(tat, 10.0, rate=5.0, burst=5)
        allowed.append(ok)
        if ok:
            tat = tat_next
        else:
            assert retry == pytest.approx(0.2)
    assert allowed == [True] * 5 + [False] * 2
    assert gcra(tat, 10.2, 5.0, 5)[0] is True  # one interval later: one more


def test_local_limits_rate_per_ip_and_other_ips_unaffected() -> None:
    limits = LocalLimits(LimitsConfig(rate_per_ip=5, burst=5))
    results = [limits.admit("10.0.0.1", 100.0) for _ in range(12)]
    assert sum(d.admitted for d in results) == 5
    refused = [d for d in results if not d.admitted]
    assert {d.reason for d in refused} == {RATE}
    assert refused[0].retry_after_header() == (b"Retry-After", b"1")
    assert limits.admit("10.0.0.2", 100.0).admitted


def test_local_limits_connections_per_ip_counts_down_on_close() -> None:
    limits = LocalLimits(LimitsConfig(connections_per_ip=3))
    assert all(limits.admit("a", 0.0).admitted for _ in range(3))
    refused = limits.admit("a", 0.0)
    assert (refused.admitted, refused.reason) == (False, CONNECTIONS)
    assert limits.closed("a") == 2
    assert limits.admit("a", 0.0).admitted
    for _ in range(5):
        limits.closed("a")
    assert "a" not in limits.open  # never below zero, forgotten at zero


def test_refused_for_connections_spends_no_rate() -> None:
    limits = LocalLimits(LimitsConfig(connections_per_ip=1, rate_per_ip=1, burst=1))
    assert limits.admit("a", 0.0).admitted
    assert limits.admit("a", 0.0).reason == CONNECTIONS
    limits.closed("a")
    assert limits.admit("a", 1.0).admitted  # the refused one did not push the TAT


def test_expire_forgets_states_in_the_past() -> None:
    limits = LocalLimits(LimitsConfig(rate_per_ip=10, burst=1))
    limits.admit("a", 0.0)
    limits.expire(0.05)
    assert "a" in limits.tats
    limits.expire(0.2)
    assert limits.tats == {}


def test_excess_is_above_max_imbalance_times_weighted_share() -> None:
    assert excess({"b1": 30, "b2": 0}, {"b1": 1, "b2": 1}, 1.2, 30) == {"b1": 12}
    assert excess({"b1": 18, "b2": 12}, {"b1": 1, "b2": 1}, 1.2, 30) == {}
    # weights: b2 may hold twice b1's share
    assert excess({"b1": 20, "b2": 10}, {"b1": 1, "b2": 2}, 1.0, 30) == {"b1": 10}
    assert excess({"b1": 30}, {"b1": 1}, 1.2, 30) == {}  # one backend: nothing to do
    assert excess({"b1": 30, "b2": 0}, {"b1": 1, "b2": 1}, 0.0, 30) == {}  # off
    # reconnects still on their way (total higher than the sum): no extra close
    assert excess({"b1": 18, "b2": 5}, {"b1": 1, "b2": 1}, 1.2, 30) == {}


def test_own_share_splits_the_excess_between_holders() -> None:
    assert own_share(12, 30, 30) == 12
    assert own_share(12, 15, 30) == 6
    assert own_share(12, 0, 30) == 0
    assert own_share(3, 1, 30) == 1  # rounded up, never more than held
    assert own_share(0, 10, 30) == 0


def test_newest_and_moved() -> None:
    assert newest(["old", "mid", "new"], 2) == ["new", "mid"]
    assert newest(["a"], 0) == []
    tunnels = [("t1", "b1", b"k1"), ("t2", "b1", b"k2"), ("t3", "b2", b"k3"), ("t4", "b1", None)]
    homes: dict[bytes, str | None] = {b"k1": "b1", b"k2": "b3", b"k3": "b3"}
    assert moved(tunnels, homes) == ["t2", "t3"]


def test_pacer_spaces_events() -> None:
    pacer = Pacer()
    assert pacer.wait(5.0) == 0.0
    assert pacer.took(5.0, 10.0) == pytest.approx(0.1)
    assert pacer.wait(5.05) == pytest.approx(0.05)
    assert pacer.wait(5.1) == pytest.approx(0.0, abs=1e-9)
    pacer.took(5.1, 2.5)
    assert pacer.wait(5.2) == pytest.approx(0.3)


def test_holder_rate_is_its_part_of_closes_per_second() -> None:
    assert holder_rate(10, 30, 30) == 10  # the only holder
    assert holder_rate(10, 15, 30) == 5  # one of two instances holding as much
    assert holder_rate(10, 0, 30) == pytest.approx(0.2)  # never 0 (a floor)
    assert holder_rate(10, 5, 0) == 10


def test_peak_total_remembers_a_few_seconds() -> None:
    peak = PeakTotal(window=3.0)
    assert peak.add(0.0, 30) == 30
    assert peak.add(1.0, 25) == 30
    assert peak.add(3.5, 28) == 28


def test_remote_counts_sum_and_skip_bad_documents() -> None:
    assert remote_counts(['{"b1": 10, "b2": 1}', '{"b1": 2}', "nonsense", '{"b1": "x"}']) == {
        "b1": 12,
        "b2": 1,
    }


BASE: dict[str, Any] = {
    "listeners": {"public": {"bind": "127.0.0.1:8080", "pool": "chat"}},
    "pools": {"chat": {"backends": [{"address": "127.0.0.1:9001"}]}},
}


def _with(
    listener: dict[str, Any] | None = None, pool: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": {"public": {**BASE["listeners"]["public"], **(listener or {})}},
        "pools": {"chat": {**BASE["pools"]["chat"], **(pool or {})}},
    }
    data.update(top)
    return data


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "lb.toml")
    return caught.value.problems


def test_limits_config_defaults_and_values() -> None:
    config = parse_config(_with(), "lb.toml")
    assert not config.listeners["public"].limits.enabled
    assert config.pools["chat"].least_connections_scope == "local"
    assert config.pools["chat"].rebalance.max_imbalance == 0
    config = parse_config(
        _with(
            {"limits": {"connections_per_ip": 3, "rate_per_ip": 2.5}},
            {"least_connections_scope": "cluster", "rebalance": {"max_imbalance": 1.2}},
        ),
        "lb.toml",
    )
    limits = config.listeners["public"].limits
    assert (limits.connections_per_ip, limits.rate_per_ip, limits.burst) == (3, 2.5, 3)
    assert config.pools["chat"].rebalance.closes_per_second == 10


def test_limits_config_problems_name_file_key_and_problem() -> None:
    problems = _problems(
        _with(
            {"limits": {"rate_per_ip": -1, "scope": "global", "burst": 2, "bogus": 1}},
            {
                "least_connections_scope": "world",
                "rebalance": {"max_imbalance": 0.5, "closes_per_second": 0},
            },
        )
    )
    text = "\n".join(problems)
    assert "lb.toml: listeners.public.limits.rate_per_ip: " in text
    assert "lb.toml: listeners.public.limits.scope: " in text
    assert "lb.toml: listeners.public.limits.bogus: unknown key" in text
    assert "lb.toml: listeners.public.limits.burst: needs rate_per_ip > 0" in text
    assert "lb.toml: pools.chat.least_connections_scope: " in text
    assert "lb.toml: pools.chat.rebalance.max_imbalance: must be 0 (off) or >= 1.0" in text
    assert "lb.toml: pools.chat.rebalance.closes_per_second: " in text


def test_redis_scope_needs_a_redis_table() -> None:
    problems = _problems(_with({"limits": {"rate_per_ip": 5, "scope": "redis"}}))
    assert problems == ["lb.toml: listeners.public.limits.scope: 'redis' needs a [redis] table"]
    parse_config(_with({"limits": {"rate_per_ip": 5, "scope": "redis"}}, redis={}), "lb.toml")


def test_a_redis_reply_as_a_decision() -> None:
    assert decision_of(["ok", "0"]).admitted
    refused = decision_of(["rate_per_ip", "1500000"])
    assert (refused.admitted, refused.reason, refused.retry_after) == (False, RATE, 1.5)
    assert refused.retry_after_header() == (b"Retry-After", b"2")
    assert decision_of(["connections_per_ip", "0"]).reason == CONNECTIONS
    assert decision_of(None).admitted  # (Redis failed: fail open)
    assert decision_of(RuntimeError("ERR script")).admitted
