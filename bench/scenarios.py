"""The scenarios: each drives the native load generator against one running target."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import (
    CLK_TCK,
    Child,
    ChildSet,
    Sample,
    check_pinned,
    fd_count,
    poll_until,
    rss_bytes,
    take_sample,
    tree_pids,
)

Metrics = dict[str, float]
Cdf = list[tuple[float, float]]
WS_PATH = "/echo"


@dataclass(frozen=True)
class Settings:
    duration: float  # seconds of measurement per timed scenario
    warmup: float = 0.3
    http_conns: int = 64
    connect_slots: int = 50
    small_conns: int = 100
    small_size: int = 100
    bulk_conns: int = 8
    bulk_size: int = 65536
    idle_conns: int = 9000  # RSS slope measured between idle_conns/2 and idle_conns
    storm_clients: int = 9000
    open_concurrency: int = 256  # idle/storm setup: at most this many opening at once


QUICK = Settings(duration=2.0, idle_conns=1000, storm_clients=1000)
FULL = Settings(duration=10.0)


@dataclass
class ScenarioResult:
    metrics: Metrics
    cdf: Cdf | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Stage:
    """One target running for one scenario: where to connect and which processes to watch."""

    target: str
    port: int
    children: ChildSet
    loadgen: Path
    backend: Child
    proxy: Child | None
    settings: Settings

    def proxy_pids(self) -> list[int]:
        return tree_pids(self.proxy.pid) if self.proxy is not None else []

    def serving_pids(self) -> list[int]:
        """The process that holds the client connections: the proxy, or the backend (direct)."""
        return self.proxy_pids() if self.proxy is not None else [self.backend.pid]

    def groups(self, gen: Child) -> dict[str, list[int]]:
        groups = {"backend": [self.backend.pid], "generator": [gen.pid]}
        if self.proxy is not None:
            groups["proxy"] = self.proxy_pids()
        return groups

    def generator(self, mode: str, *args: str, alarm: float = 300) -> Child:
        cmd = [str(self.loadgen), "-m", mode, "-p", str(self.port), "-T", str(int(alarm)), *args]
        gen = self.children.start(f"loadgen-{self.target}-{mode}", cmd, cpu=0, interactive=True)
        check_pinned([gen.pid], cpu=0)
        return gen


def parse_result(line: str) -> dict[str, object]:
    data = json.loads(line.removeprefix("RESULT "))
    if not isinstance(data, dict):
        raise ValueError(f"bad loadgen result: {line[:200]}")
    return data


def num(data: dict[str, object], key: str) -> float:
    value = data[key]
    if not isinstance(value, int | float):
        raise ValueError(f"loadgen result {key!r} is not a number: {value!r}")
    return float(value)


def cdf_of(data: dict[str, object]) -> Cdf:
    raw = data.get("cdf")
    if not isinstance(raw, list):
        return []
    return [(float(q), float(us) / 1000.0) for q, us in raw]


def cpu_metrics(s0: Sample, s1: Sample, ops: float) -> Metrics:
    """CPU % of each group, per-CPU busy %, and CPU-µs per operation (proxy and backend)."""
    wall = max(s1.when - s0.when, 1e-9)
    out: Metrics = {}
    for name in s0.ticks:
        secs = (s1.ticks[name] - s0.ticks[name]) / CLK_TCK
        out[f"{name}_cpu_pct"] = round(100.0 * secs / wall, 1)
        if name in ("proxy", "backend") and ops > 0:
            out[f"{name}_cpu_us"] = round(secs * 1e6 / ops, 3)
    for cpu in ("cpu0", "cpu1"):
        if cpu in s0.cpus and cpu in s1.cpus:
            busy = s1.cpus[cpu][0] - s0.cpus[cpu][0]
            total = max(s1.cpus[cpu][1] - s0.cpus[cpu][1], 1)
            out[f"{cpu}_busy_pct"] = round(100.0 * busy / total, 1)
    return out


def timed(stage: Stage, mode: str, *args: str) -> tuple[dict[str, object], Metrics]:
    """Run a timed loadgen mode; returns its result and the CPU metrics of its window."""
    dur = stage.settings.duration
    extra = ("-d", str(dur), "-W", str(stage.settings.warmup), *args)
    gen = stage.generator(mode, *extra, alarm=dur + 120)
    gen.expect("MEASURE_START", timeout=40)
    groups = stage.groups(gen)
    s0 = take_sample(groups)
    gen.expect("MEASURE_END", timeout=dur + 40)
    s1 = take_sample(groups)
    res = parse_result(gen.expect("RESULT ", timeout=20))
    return res, cpu_metrics(s0, s1, num(res, "ops"))


def latency(res: dict[str, object]) -> Metrics:
    return {
        "p50_ms": num(res, "p50_us") / 1000.0,
        "p99_ms": num(res, "p99_us") / 1000.0,
        "errors": num(res, "errors"),
    }


def http_rps(stage: Stage) -> ScenarioResult:
    s = stage.settings
    res, cpu = timed(stage, "http", "-c", str(s.http_conns), "-u", "/")
    metrics = {"rps": num(res, "ops_per_s"), **latency(res), **cpu}
    return ScenarioResult(metrics, cdf_of(res))


def ws_connect_rate(stage: Stage) -> ScenarioResult:
    s = stage.settings
    args = ("-c", str(s.connect_slots), "-s", str(s.small_size), "-u", WS_PATH)
    res, cpu = timed(stage, "connect", *args)
    metrics = {"conn_per_s": num(res, "ops_per_s"), **latency(res), **cpu}
    return ScenarioResult(metrics, cdf_of(res))


def ws_echo_small(stage: Stage) -> ScenarioResult:
    s = stage.settings
    args = ("-c", str(s.small_conns), "-s", str(s.small_size), "-u", WS_PATH)
    res, cpu = timed(stage, "echo", *args)
    metrics = {"msgs_per_s": num(res, "ops_per_s"), **latency(res), **cpu}
    return ScenarioResult(metrics, cdf_of(res))


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
}
