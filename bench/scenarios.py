"""The scenarios: each drives the native load generator against one running target."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bench.failover import failover
from bench.procs import fd_count, poll_until, rss_bytes, take_sample
from bench.scaling import workers_scaling
from bench.stage import (
    WS_PATH,
    Metrics,
    ScenarioResult,
    Stage,
    cdf_of,
    connect_args,
    cpu_metrics,
    latency,
    num,
    parse_result,
    timed,
)
from bench.upgrade import upgrade


def http_rps(stage: Stage) -> ScenarioResult:
    s = stage.settings
    res, cpu = timed(stage, "http", "-c", str(s.http_conns), "-u", "/")
    metrics = {"rps": num(res, "ops_per_s"), **latency(res), **cpu}
    return ScenarioResult(metrics, cdf_of(res))


def ws_connect_rate(stage: Stage) -> ScenarioResult:
    res, cpu = timed(stage, "connect", *connect_args(stage.settings))
    metrics = {"conn_per_s": num(res, "ops_per_s"), **latency(res), **cpu}
    return ScenarioResult(metrics, cdf_of(res))


def ws_connect_rate_limits(stage: Stage) -> ScenarioResult:
    """``ws_connect_rate`` against lbproxy with ``[listeners.web.limits]`` scope "redis" on
    (limits never reached): the latency one Redis admission adds to each new connection."""
    return ws_connect_rate(stage)


def ws_echo_small(stage: Stage) -> ScenarioResult:
    s = stage.settings
    args = ("-c", str(s.small_conns), "-s", str(s.small_size), "-u", WS_PATH)
    res, cpu = timed(stage, "echo", *args)
    metrics = {"msgs_per_s": num(res, "ops_per_s"), **latency(res), **cpu}
    return ScenarioResult(metrics, cdf_of(res))


LIMITS_MISSING = (
    "limits off: same as ws_echo_small (lbproxy check-config rejects "
    "[pools.be.websocket]; this is a real run with the plain ws_echo_small config)"
)


def ws_echo_small_limits(stage: Stage) -> ScenarioResult:
    """``ws_echo_small`` against lbproxy with the ``[pools.be.websocket]`` pings, limits and
    message metrics on (when lbproxy accepts those keys; otherwise the plain config, said in a
    note)."""
    result = ws_echo_small(stage)
    result.metrics["limits_on"] = 1.0 if stage.limits else 0.0
    if not stage.limits:
        result.notes.append(LIMITS_MISSING)
    return result


def ws_echo_bulk(stage: Stage) -> ScenarioResult:
    s = stage.settings
    args = ("-c", str(s.bulk_conns), "-s", str(s.bulk_size), "-u", WS_PATH)
    res, cpu = timed(stage, "echo", *args)
    metrics = {
        "mb_per_s": num(res, "payload_mb_per_s"),
        "msgs_per_s": num(res, "ops_per_s"),
        **latency(res),
        **cpu,
    }
    if "proxy_cpu_us" in cpu:  # CPU-ms per GB of echoed payload (one direction), as in figures.md
        metrics["proxy_cpu_ms_per_gb"] = round(cpu["proxy_cpu_us"] / 1000.0 * 1e9 / s.bulk_size, 1)
    return ScenarioResult(metrics, cdf_of(res))


def idle_ws_memory(stage: Stage) -> ScenarioResult:
    """RSS growth of the serving process per idle websocket between N/2 and N connections."""
    s = stage.settings
    pids = stage.serving_pids()
    rss0 = rss_bytes(pids)
    gen = stage.generator(
        "idle",
        "-c",
        str(s.idle_conns),
        "-P",
        "2",
        "-s",
        str(s.small_size),
        "-k",
        str(s.open_concurrency),
        "-u",
        WS_PATH,
    )
    groups = stage.groups(gen)
    s0 = take_sample(groups)
    open1 = int(gen.expect("PHASE 1 ", timeout=150).split()[3])
    rss1 = rss_bytes(stage.serving_pids())
    gen.send_line()
    open2 = int(gen.expect("PHASE 2 ", timeout=150).split()[3])
    s1 = take_sample(groups)
    pids = stage.serving_pids()
    rss2, fds = rss_bytes(pids), fd_count(pids)
    gen.send_line()
    res = parse_result(gen.expect("RESULT ", timeout=30))
    if open2 <= open1:
        raise RuntimeError(f"idle: no connections opened in phase 2 ({open1} -> {open2})")
    metrics: Metrics = {
        "bytes_per_conn": round((rss2 - rss1) / (open2 - open1)),
        "bytes_per_conn_from_start": round((rss2 - rss0) / max(open2, 1)),
        "rss_fresh_kb": rss0 // 1024,
        "rss_half_kb": rss1 // 1024,
        "rss_full_kb": rss2 // 1024,
        "conns_half": open1,
        "conns_full": open2,
        "fds_at_full": fds,
        "errors": num(res, "errors"),
        "dropped": num(res, "dropped"),
        "setup_p50_ms": num(res, "p50_us") / 1000.0,
        "setup_p99_ms": num(res, "p99_us") / 1000.0,
        **cpu_metrics(s0, s1, open2),
    }
    notes = ["RSS of the C backend (there is no proxy)"] if stage.proxy is None else []
    return ScenarioResult(metrics, None, notes)


def reconnect_storm(stage: Stage) -> ScenarioResult:
    """N clients close from the client side, then all reconnect at once."""
    s = stage.settings
    fds0 = fd_count(stage.serving_pids())
    gen = stage.generator(
        "storm",
        "-c",
        str(s.storm_clients),
        "-s",
        str(s.small_size),
        "-k",
        str(s.open_concurrency),
        "-u",
        WS_PATH,
        alarm=400,
    )
    opened = int(gen.expect("OPEN ", timeout=150).split()[1])
    gen.send_line()  # close them all
    gen.expect("CLOSED", timeout=30)
    # "after their connections are closed": wait until the serving process has released them
    settled = poll_until(
        lambda: fd_count(stage.serving_pids()) <= fds0 + 8, timeout=30, interval=0.05
    )
    groups = stage.groups(gen)
    s0 = take_sample(groups)
    gen.send_line()  # reconnect all at once
    gen.expect("STORM_DONE", timeout=120)
    s1 = take_sample(groups)
    res = parse_result(gen.expect("RESULT ", timeout=30))
    reconnected = num(res, "opened")
    metrics: Metrics = {
        "storm_s": num(res, "secs"),
        "clients": float(s.storm_clients),
        "opened_before": float(opened),
        "reconnected": reconnected,
        "failed": float(s.storm_clients) - reconnected,
        "conn_per_s": round(reconnected / max(num(res, "secs"), 1e-9), 1),
        **latency(res),
        **cpu_metrics(s0, s1, reconnected),
    }
    notes = [] if settled else ["old connections not all released within 30 s before the storm"]
    return ScenarioResult(metrics, cdf_of(res), notes)


SCENARIOS: dict[str, Callable[[Stage], ScenarioResult]] = {
    "http_rps": http_rps,
    "ws_connect_rate": ws_connect_rate,
    "ws_echo_small": ws_echo_small,
    "ws_echo_bulk": ws_echo_bulk,
    "idle_ws_memory": idle_ws_memory,
    "reconnect_storm": reconnect_storm,
    "workers_scaling": workers_scaling,
    "failover": failover,
    "ws_echo_small_limits": ws_echo_small_limits,
    "ws_connect_rate_limits": ws_connect_rate_limits,
    "upgrade": upgrade,
}
# Scenarios that only some targets take part in (the others: every target).
SCENARIO_TARGETS: dict[str, tuple[str, ...]] = {
    "workers_scaling": ("lbproxy",),
    "failover": ("lbproxy", "nginx", "haproxy", "caddy"),  # two backends: no `direct`
    "ws_echo_small_limits": ("lbproxy",),
    "ws_connect_rate_limits": ("lbproxy",),
    "upgrade": ("lbproxy",),
}
# Left out of `--quick` unless named with --scenarios (they would cost time, not coverage).
QUICK_SKIP = ("ws_echo_small_limits", "ws_connect_rate_limits", "upgrade")


def targets_for(scenario: str, targets: Sequence[str]) -> list[str]:
    """The targets among ``targets`` that ``scenario`` runs against (order kept)."""
    allowed = SCENARIO_TARGETS.get(scenario)
    return [t for t in targets if allowed is None or t in allowed]
