"""``workers_scaling`` (lbproxy only): websocket connect rate of ``serve --workers 2`` against
``--workers 1`` on the same two cores.

Neither lbproxy nor the C backend nor the load generator is pinned (all may run on CPUs 0-1):
pinning the proxy to one CPU would defeat the point. On a 2-core machine the generator and the
backend therefore take CPU from the two workers, so ``scaling`` is a lower bound of what two
cores dedicated to the proxy would give."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from bench.procs import http_get, tree_pids
from bench.stage import (
    Launched,
    Metrics,
    ScenarioResult,
    Stage,
    connect_args,
    latency,
    num,
    timed,
)

WORKER_COUNTS = (1, 2)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def accepted_per_worker(admin_port: int) -> list[float]:
    """Client connections each worker accepted, from the balancer's ``GET /api/info``."""
    body = http_get(admin_port, "/api/info")
    if not body.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"admin port {admin_port}: /api/info failed: {body[:200]!r}")
    info = json.loads(body.split(b"\r\n\r\n", 1)[1])
    return [float(w.get("accepted", 0)) for w in info["workers"]]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(stage: Stage, run: Launched) -> tuple[Metrics, list[float]]:
    """One connect-rate window against ``run``; its metrics and each worker's accepted count.
    With workers, also the supervisor's own CPU over the run (it must stay near zero)."""
    sub = replace(stage, port=run.port, proxy=run.child)
    before, started = cpu_seconds(run.child.pid), time.monotonic()
    res, cpu = timed(sub, "connect", *connect_args(stage.settings))
    spent, wall = cpu_seconds(run.child.pid) - before, time.monotonic() - started
    if not run.child.alive() or tuple(sorted(tree_pids(run.child.pid))) != run.pids:
        raise RuntimeError(
            f"lbproxy workers changed during the window (a worker died?):\n{run.child.log_tail()}"
        )
    accepted = accepted_per_worker(run.admin_ports[0])
    metrics: Metrics = {"conn_per_s": num(res, "ops_per_s"), **latency(res), **cpu}
    if len(run.pids) > 1:  # a supervisor and its workers
        metrics["supervisor_cpu_pct"] = round(100.0 * spent / max(wall, 1e-9), 2)
        ops = num(res, "ops")
        if ops > 0:
            metrics["supervisor_cpu_us"] = round(spent * 1e6 / ops, 3)
    return metrics, accepted


def workers_scaling(stage: Stage) -> ScenarioResult:
    """Connect rate with 1 then 2 workers; ``scaling`` = conn/s(2 workers) / conn/s(1 worker)."""
    if stage.launch is None:
        raise RuntimeError("workers_scaling starts lbproxy itself: the stage has no launcher")
    metrics: Metrics = {}
    shares: list[float] = []
    for workers in WORKER_COUNTS:
        run = stage.launch(workers)
        try:
            window, accepted = measure(stage, run)
        finally:
            run.child.stop()
        metrics.update({f"{key}_{workers}w": value for key, value in window.items()})
        metrics[f"processes_{workers}w"] = float(len(run.pids))
        if workers == 2:
            shares = [n / max(sum(accepted), 1.0) for n in accepted]
    one, two = metrics["conn_per_s_1w"], metrics["conn_per_s_2w"]
    if one <= 0:
        raise RuntimeError("workers_scaling: no connection completed with 1 worker")
    metrics["scaling"] = round(two / one, 3)
    # the least busy worker's share of the connections accepted with 2 workers (0.5 = even)
    metrics["worker_share_min_2w"] = round(min(shares), 3)
    # What 2 cores given to the proxy alone would carry, from what was measured: each worker
    # at the per-connection CPU cost measured with 2 workers, the busier worker (SO_REUSEPORT
    # is not an exact split) saturating first; divided by the 1-worker rate per CPU.
    cpu_1w, cpu_2w = metrics["proxy_cpu_us_1w"], metrics["proxy_cpu_us_2w"]
    busiest = max(shares) if shares else 0.5
    if cpu_1w > 0 and cpu_2w > 0:
        metrics["projected_scaling"] = round((cpu_1w / cpu_2w) / busiest, 3)
    notes = [
        "lbproxy, backend and generator all unpinned on CPUs 0-1: the generator and backend "
        "compete with the 2 workers for the same 2 cores, so `scaling` is a lower bound of "
        "what 2 dedicated cores would give",
        "`projected_scaling` = (proxy CPU-us per connection with 1 worker / with 2 workers) "
        "/ the busier worker's share: the rate 2 dedicated cores would carry at the measured "
        "per-connection cost, an estimate, not a measurement",
        "`proxy_cpu_us` = CPU-us per connection of the whole lbproxy process tree (with 2 "
        "workers: the supervisor and both workers); `supervisor_cpu_pct_2w` / "
        "`supervisor_cpu_us_2w` = the supervisor's own CPU over the run (admin, health "
        "checks, snapshots; never on the data path, so it stays near zero)",
    ]
    return ScenarioResult(metrics, None, notes)
