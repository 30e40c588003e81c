"""``workers_scaling`` (lbproxy only): websocket connect rate of ``serve --workers 2`` against
``--workers 1`` on the same two cores.

Neither lbproxy nor the C backend nor the load generator is pinned (all may run on CPUs 0-1):
pinning the proxy to one CPU would defeat the point. On a 2-core machine the generator and the
backend therefore take CPU from the two workers, so ``scaling`` is a lower bound of what two
cores dedicated to the proxy would give."""

from __future__ import annotations

import re
from dataclasses import replace

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
CONNECTIONS_TOTAL = re.compile(rb"^lbproxy_connections_total\{[^}]*\} ([0-9.eE+]+)$", re.M)


def accepted_connections(admin_port: int) -> float:
    """Client connections one lbproxy process accepted (``lbproxy_connections_total``)."""
    body = http_get(admin_port, "/metrics")
    if not body.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"admin port {admin_port}: /metrics failed: {body[:200]!r}")
    return sum(float(v) for v in CONNECTIONS_TOTAL.findall(body))


def measure(stage: Stage, run: Launched) -> tuple[Metrics, list[float]]:
    """One connect-rate window against ``run``; its metrics and each worker's accepted count."""
    sub = replace(stage, port=run.port, proxy=run.child)
    res, cpu = timed(sub, "connect", *connect_args(stage.settings))
    if not run.child.alive() or tuple(sorted(tree_pids(run.child.pid))) != run.pids:
        raise RuntimeError(
            f"lbproxy workers changed during the window (a worker died?):\n{run.child.log_tail()}"
        )
    accepted = [accepted_connections(port) for port in run.admin_ports]
    return {"conn_per_s": num(res, "ops_per_s"), **latency(res), **cpu}, accepted


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
    ]
    return ScenarioResult(metrics, None, notes)
