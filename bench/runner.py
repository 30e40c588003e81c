"""Run every (scenario, target) pair, each with fresh processes, and take medians over repeats."""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench.build import NativeTools
from bench.procs import (
    ChildSet,
    check_pinned,
    free_port,
    http_get_ok,
    poll_until,
    port_open,
    tree_pids,
)
from bench.scenarios import SCENARIOS, Cdf, Metrics, ScenarioResult, Settings, Stage
from bench.targets import Ports, proxy_spec


@dataclass
class RunOutcome:
    """Everything the report needs: medians, latency CDFs, notes and failures."""

    results: dict[str, dict[str, Metrics]] = field(default_factory=dict)
    cdfs: dict[str, dict[str, Cdf]] = field(default_factory=dict)
    notes: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    configs: dict[str, Path] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)


def distinct_ports() -> Ports:
    picked: list[int] = []
    while len(picked) < 3:
        port = free_port()
        if port not in picked:
            picked.append(port)
    return Ports(listen=picked[0], backend=picked[1], admin=picked[2])


def run_pair(
    target: str,
    scenario: str,
    settings: Settings,
    tools: NativeTools,
    run_dir: Path,
    outcome: RunOutcome,
) -> ScenarioResult:
    """Start the backend (CPU 0) and the proxy (CPU 1), run ``scenario``, stop both by PID."""
    ports = distinct_ports()
    log_dir = run_dir / "logs" / f"{scenario}-{target}"
    log_dir.mkdir(parents=True, exist_ok=True)
    with ChildSet(log_dir) as children:
        backend = children.start("backend", [str(tools.backend), "-p", str(ports.backend)], cpu=0)
        if not poll_until(lambda: port_open(ports.backend), timeout=10):
            raise RuntimeError(f"backend did not listen: {backend.log_tail()}")
        spec = proxy_spec(target, run_dir, ports, bulk=scenario == "ws_echo_bulk")
        if spec.config_path is not None:
            outcome.configs[spec.config_path.name] = spec.config_path
        proxy = None
        port = ports.backend
        if spec.command:
            proxy = children.start(target, spec.command, cpu=1)
            port = ports.listen
            if not poll_until(
                lambda: not proxy.alive() or http_get_ok(port), timeout=30, interval=0.1
            ):
                raise RuntimeError(f"{target} did not serve within 30 s:\n{proxy.log_tail()}")
            if not proxy.alive():
                raise RuntimeError(
                    f"{target} exited (rc={proxy.popen.wait()}):\n{proxy.log_tail()}"
                )
            check_pinned(tree_pids(proxy.pid), cpu=1)
        check_pinned([backend.pid], cpu=0)
        stage = Stage(target, port, children, tools.loadgen, backend, proxy, settings)
        result = SCENARIOS[scenario](stage)
        if proxy is not None and not proxy.alive():
            raise RuntimeError(f"{target} died during {scenario}:\n{proxy.log_tail()}")
        return result


def median_metrics(runs: list[Metrics]) -> Metrics:
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: round(float(statistics.median(r[k] for r in runs)), 3) for k in keys}


def run_all(
    targets: list[str],
    scenarios: list[str],
    settings: Settings,
    repeat: int,
    tools: NativeTools,
    run_dir: Path,
) -> RunOutcome:
    outcome = RunOutcome()
    runs: dict[tuple[str, str], list[ScenarioResult]] = {}
    for rep in range(1, repeat + 1):
        for scenario in scenarios:
            for target in targets:  # targets interleaved so slow drift hits all of them alike
                label = f"[rep {rep}/{repeat}] {scenario} / {target}"
                started = time.monotonic()
                try:
                    result = run_pair(target, scenario, settings, tools, run_dir, outcome)
                except (RuntimeError, TimeoutError, ValueError, OSError, KeyError) as exc:
                    outcome.failures.append(f"{label}: {exc}")
                    print(f"{label}: FAILED: {exc}", file=sys.stderr, flush=True)
                    traceback.print_exc(file=sys.stderr)
                    continue
                took = time.monotonic() - started
                outcome.durations[f"{scenario}/{target}/{rep}"] = round(took, 2)
                runs.setdefault((scenario, target), []).append(result)
                print(f"{label}: {headline(scenario, result.metrics)} ({took:.1f}s)", flush=True)
    for (scenario, target), results in runs.items():
        outcome.results.setdefault(scenario, {})[target] = median_metrics(
            [r.metrics for r in results]
        )
        last_cdf = next((r.cdf for r in reversed(results) if r.cdf), None)
        if last_cdf:
            outcome.cdfs.setdefault(scenario, {})[target] = last_cdf
        notes = sorted({n for r in results for n in r.notes})
        if notes:
            outcome.notes.setdefault(scenario, {})[target] = notes
    return outcome


MAIN_METRIC = {
    "http_rps": "rps",
    "ws_connect_rate": "conn_per_s",
    "ws_echo_small": "msgs_per_s",
    "ws_echo_bulk": "mb_per_s",
    "idle_ws_memory": "bytes_per_conn",
    "reconnect_storm": "storm_s",
}


def headline(scenario: str, metrics: Metrics) -> str:
    keys = [MAIN_METRIC[scenario], "p50_ms", "p99_ms", "proxy_cpu_us", "errors"]
    return " ".join(f"{k}={metrics[k]:g}" for k in keys if k in metrics)
