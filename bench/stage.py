"""What every scenario works with: the settings, the running target (a Stage) and the helpers
that drive the native load generator and turn its output and /proc samples into metrics."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import profile
from bench.procs import (
    CLK_TCK,
    Child,
    ChildSet,
    Sample,
    check_pinned,
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
    failover_conns: int = 1000
    failover_warmup: float = 1.0  # seconds of echoing (all clients up) before the kill
    failover_after: float = 5.0  # the run goes on this long after the kill (once recovered)
    failover_timeout: float = 30.0  # not every client echoing again by then: the pair fails
    failover_backoff_ms: float = 50.0  # reconnect backoff base (jittered, doubling, 1 s cap)
    # each failover client sends its next message this long after its previous one (a paced
    # load: a saturating closed loop made recover_s measure which proxy's echo traffic left
    # the reconnects more CPU, and it spread 0.2-0.9 s run to run for the same proxy)
    failover_pace_ms: float = 100.0
    upgrade_idle: int = 9000  # upgrade: idle websockets handed over
    upgrade_echo: int = 100  # upgrade: websockets echoing through the hand-over
    profile: str = ""  # --profile perf|strace: profile the proxy over timed windows
    profile_dir: str = ""  # where bench/profile.py writes its reports (OUT/profiles)


QUICK = Settings(
    duration=2.0,
    idle_conns=1000,
    storm_clients=1000,
    failover_conns=100,
    failover_warmup=0.3,
    failover_after=0.5,
    failover_timeout=10.0,
    upgrade_idle=1000,
)
FULL = Settings(duration=10.0)


@dataclass
class ScenarioResult:
    metrics: Metrics
    cdf: Cdf | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Launched:
    """An ``lbproxy serve --workers N`` started by a Stage's launcher, serving and checked."""

    child: Child
    port: int  # the shared listen port
    admin_ports: tuple[int, ...]  # the balancer's one admin API (the supervisor's)
    pids: tuple[int, ...]  # the whole process tree once every worker served


@dataclass
class Stage:
    """One target running for one scenario: where to connect and which processes to watch.

    ``gen_cpus`` is the taskset CPU list of the load generator. ``launch`` is set only for
    scenarios that start the proxy themselves (``workers_scaling``): it starts lbproxy with
    the given number of workers on fresh ports and returns once every worker serves."""

    target: str
    port: int
    children: ChildSet
    loadgen: Path
    backend: Child
    proxy: Child | None
    settings: Settings
    gen_cpus: str = "0"
    launch: Callable[[int], Launched] | None = None
    backend2: Child | None = None  # failover: the second backend (the one killed)
    limits: bool = False  # ws_echo_small_limits: lbproxy runs with the websocket keys
    scenario: str = ""  # names the --profile report

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
        name = f"loadgen-{self.target}-{mode}"
        gen = self.children.start(name, cmd, cpu=self.gen_cpus, interactive=True)
        check_pinned([gen.pid], cpu=self.gen_cpus)
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
    capture = None
    if stage.settings.profile and stage.proxy is not None:
        out = Path(stage.settings.profile_dir)
        name = f"{stage.scenario or mode}-{stage.target}-{stage.settings.profile}"
        capture = profile.start(stage.settings.profile, stage.proxy_pids(), out, name)
    gen.expect("MEASURE_END", timeout=dur + 40)
    s1 = take_sample(groups)
    res = parse_result(gen.expect("RESULT ", timeout=20))
    cpu = cpu_metrics(s0, s1, num(res, "ops"))
    if capture is not None:
        capture.stop(num(res, "ops"), cpu.get("proxy_cpu_us", 0.0))
    return res, cpu


def latency(res: dict[str, object]) -> Metrics:
    return {
        "p50_ms": num(res, "p50_us") / 1000.0,
        "p99_ms": num(res, "p99_us") / 1000.0,
        "errors": num(res, "errors"),
    }


def connect_args(s: Settings) -> tuple[str, ...]:
    """loadgen ``connect`` mode arguments: slots, message size, websocket path."""
    return ("-c", str(s.connect_slots), "-s", str(s.small_size), "-u", WS_PATH)
