"""Run every (scenario, target) pair, each with fresh processes, and take medians over repeats."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.build import NativeTools
from bench.procs import (
    BOTH_CPUS,
    Child,
    ChildSet,
    check_pinned,
    free_port,
    free_port_run,
    http_get_ok,
    poll_until,
    port_open,
    tree_pids,
)
from bench.scenarios import SCENARIOS, targets_for
from bench.stage import Cdf, Launched, Metrics, ScenarioResult, Settings, Stage
from bench.targets import Ports, ProxySpec, lbproxy_accepts, lbproxy_workers_spec, proxy_spec

SELF_LAUNCHED = {
    "workers_scaling",
    "upgrade",
}  # scenarios that start (and stop) the proxy themselves
# config variant per scenario
VARIANTS = {
    "failover": "failover",
    "ws_echo_small_limits": "limits",
    "ws_connect_rate_limits": "admission",
}


@dataclass
class RunOutcome:
    """Everything the report needs: medians, latency CDFs, notes and failures."""

    results: dict[str, dict[str, Metrics]] = field(default_factory=dict)
    cdfs: dict[str, dict[str, Cdf]] = field(default_factory=dict)
    notes: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    configs: dict[str, Path] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)


def distinct_ports(backend: int | None = None) -> Ports:
    """Free listen, backend, admin and second backend ports; admin + 1 is free too (worker 1's
    admin API)."""
    picked = [] if backend is None else [backend]
    while len(picked) < 3:
        port = free_port()
        if port not in picked:
            picked.append(port)
    admin = free_port_run(2, avoid=picked)
    if backend is None:
        return Ports(listen=picked[0], backend=picked[1], admin=admin, backend2=picked[2])
    return Ports(listen=picked[1], backend=backend, admin=admin, backend2=picked[2])


def start_proxy(
    children: ChildSet, name: str, command: tuple[str, ...], port: int, cpu: int | str
) -> Child:
    """Start a proxy on ``cpu`` and wait until a GET through ``port`` gets a 200."""
    proxy = children.start(name, command, cpu=cpu)
    if not poll_until(lambda: not proxy.alive() or http_get_ok(port), timeout=30, interval=0.1):
        raise RuntimeError(f"{name} did not serve within 30 s:\n{proxy.log_tail()}")
    if not proxy.alive():
        raise RuntimeError(f"{name} exited (rc={proxy.popen.wait()}):\n{proxy.log_tail()}")
    return proxy


def workers_launcher(
    children: ChildSet, run_dir: Path, backend_port: int, outcome: RunOutcome
) -> Callable[[int], Launched]:
    """For ``workers_scaling``: start ``lbproxy serve --workers N`` (unpinned) on fresh ports."""

    def launch(workers: int) -> Launched:
        ports = distinct_ports(backend=backend_port)
        spec = lbproxy_workers_spec(run_dir, ports, workers)
        assert spec.config_path is not None
        outcome.configs[spec.config_path.name] = spec.config_path
        proxy = start_proxy(children, f"lbproxy-{workers}w", spec.command, ports.listen, BOTH_CPUS)
        admin_ports = (ports.admin,)  # one admin API for the whole balancer (the supervisor's)
        want = workers + 1 if workers > 1 else 1  # the supervisor never proxies
        if not poll_until(
            lambda: (
                all(http_get_ok(p, "/healthz") for p in admin_ports)
                and len(tree_pids(proxy.pid)) == want
            ),
            timeout=30,
            interval=0.1,
        ):
            raise RuntimeError(
                f"lbproxy --workers {workers}: not {want} processes with every admin API "
                f"{admin_ports} up within 30 s:\n{proxy.log_tail()}"
            )
        pids = tuple(sorted(tree_pids(proxy.pid)))
        for pid in pids:  # every process of the tree on both CPUs, whatever it inherited
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(pid, {0, 1})
        check_pinned(pids, cpu=BOTH_CPUS)
        return Launched(proxy, ports.listen, admin_ports, pids)

    return launch


def start_backend(
    children: ChildSet, name: str, cmd: list[str], port: int, cpu: int | str
) -> Child:
    backend = children.start(name, cmd, cpu=cpu)
    if not poll_until(lambda: port_open(port), timeout=10):
        raise RuntimeError(f"{name} did not listen: {backend.log_tail()}")
    check_pinned([backend.pid], cpu=cpu)
    return backend


def scenario_spec(
    target: str, scenario: str, run_dir: Path, ports: Ports
) -> tuple[ProxySpec, bool]:
    """The proxy config for this pair, and whether the websocket limits are on (only
    ``ws_echo_small_limits``, when lbproxy accepts the keys; else the plain config)."""
    variant = VARIANTS.get(scenario, "")
    spec = proxy_spec(target, run_dir, ports, bulk=scenario == "ws_echo_bulk", variant=variant)
    if variant != "limits" or spec.config_path is None:
        return spec, False
    if lbproxy_accepts(spec.config_path):
        return spec, True
    return proxy_spec(target, run_dir, ports, bulk=False), False


def run_pair(
    target: str,
    scenario: str,
    settings: Settings,
    tools: NativeTools,
    run_dir: Path,
    outcome: RunOutcome,
) -> ScenarioResult:
    """Start the backend (CPU 0) and the proxy (CPU 1), run ``scenario``, stop both by PID.
    ``workers_scaling`` leaves everything unpinned and starts lbproxy itself (twice)."""
    ports = distinct_ports()
    log_dir = run_dir / "logs" / f"{scenario}-{target}"
    log_dir.mkdir(parents=True, exist_ok=True)
    own_proxy = scenario in SELF_LAUNCHED
    side_cpu: int | str = BOTH_CPUS if own_proxy else 0
    failover = scenario == "failover"
    with ChildSet(log_dir) as children:
        backend_cmd = [
            str(tools.backend),
            "-p",
            str(ports.backend),
            *(("-i", "1") if failover else ()),
        ]
        backend = start_backend(children, "backend", backend_cmd, ports.backend, side_cpu)
        stage = Stage(target, ports.backend, children, tools.loadgen, backend, None, settings)
        stage.scenario = scenario
        if failover:  # the one killed: a separate process
            cmd2 = [str(tools.backend), "-p", str(ports.backend2), "-i", "2"]
            stage.backend2 = start_backend(children, "backend2", cmd2, ports.backend2, side_cpu)
        if VARIANTS.get(scenario) == "admission":  # the shared limits' Redis (unpinned)
            redis_cmd = ["redis-server", "--port", str(ports.backend2), "--save", ""]
            start_backend(
                children, "redis", [*redis_cmd, "--appendonly", "no"], ports.backend2, BOTH_CPUS
            )
        if own_proxy:
            stage.gen_cpus = BOTH_CPUS
            stage.launch = workers_launcher(children, run_dir, ports.backend, outcome)
        else:
            spec, stage.limits = scenario_spec(target, scenario, run_dir, ports)
            if spec.config_path is not None:
                outcome.configs[spec.config_path.name] = spec.config_path
            if spec.command:
                stage.proxy = start_proxy(children, target, spec.command, ports.listen, cpu=1)
                stage.port = ports.listen
                check_pinned(stage.proxy_pids(), cpu=1)
        result = SCENARIOS[scenario](stage)
        if stage.proxy is not None and not stage.proxy.alive():
            raise RuntimeError(f"{target} died during {scenario}:\n{stage.proxy.log_tail()}")
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
    for scenario in scenarios:
        if not targets_for(scenario, targets):
            print(f"{scenario}: skipped (not run against {','.join(targets)})", flush=True)
    for rep in range(1, repeat + 1):
        for scenario in scenarios:
            for target in targets_for(
                scenario, targets
            ):  # targets interleaved so slow drift hits all of them alike
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
    "workers_scaling": "scaling",
    "failover": "recover_s",
    "ws_echo_small_limits": "msgs_per_s",
    "ws_connect_rate_limits": "conn_per_s",
    "upgrade": "handover_s",
}
HEADLINE_KEYS = (
    "p50_ms",
    "p99_ms",
    "proxy_cpu_us",
    "errors",
    "failed_handshakes",
    "lost_echoes",
    "in_flight_at_kill",
    "limits_on",
    "longest_pause_ms",
    "moved",
    "idle_dropped",
    "echo_errors",
)
SCALING_KEYS = ("conn_per_s_1w", "conn_per_s_2w", "proxy_cpu_us_1w", "proxy_cpu_us_2w")


def headline(scenario: str, metrics: Metrics) -> str:
    keys = [MAIN_METRIC[scenario], *HEADLINE_KEYS, *SCALING_KEYS]
    return " ".join(f"{k}={metrics[k]:g}" for k in keys if k in metrics)
