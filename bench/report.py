"""results.json and report.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.runner import MAIN_METRIC, RunOutcome
from bench.scenarios import SCENARIO_TARGETS
from bench.stage import Metrics, Settings
from bench.targets import PEERS, TARGETS

QUIET_LOAD = 1.5
WORKER_SUFFIXES = ("_1w", "_2w")
HIGHER_BETTER = {
    "rps",
    "conn_per_s",
    "msgs_per_s",
    "mb_per_s",
    "reconnected",
    "scaling",
    "projected_scaling",
    "worker_share_min",
}
LOWER_BETTER = {
    "handover_s",
    "upgrade_s",
    "longest_pause_ms",
    "idle_dropped",
    "echo_errors",
    "p50_ms",
    "p99_ms",
    "proxy_cpu_us",
    "backend_cpu_us",
    "proxy_cpu_ms_per_gb",
    "bytes_per_conn",
    "bytes_per_conn_from_start",
    "storm_s",
    "errors",
    "failed",
    "dropped",
    "setup_p50_ms",
    "setup_p99_ms",
    "recover_s",
    "recover_p50_s",
    "failed_handshakes",
    "hs_5xx",
    "hs_other_status",
    "hs_resets",
    "lost_echoes",
    "survivor_closed",
}
RATIO_HEADS = [f"lbproxy/{peer}" for peer in PEERS]
METHOD = """\
- Every (scenario, target) pair runs with fresh processes (pinning as follows except in
  `workers_scaling`, below): the C backend (`bench/native/backend.c`,
  HTTP 200 + websocket echo on one port) pinned to CPU 0, the proxy pinned to CPU 1, the C load
  generator (`bench/native/loadgen.c`) pinned to CPU 0; all with `taskset`, all on 127.0.0.1,
  all stopped by PID at the end (pinning checked in `/proc/PID/status` Cpus_allowed_list).
  `direct` = the generator talks to the backend, no proxy. Caddy (Debian package) runs with
  `GOMAXPROCS=1` (one OS thread running Go code, like the one worker / thread / process of the
  others), its admin endpoint and automatic HTTPS off, a plain `http://` site bound to
  127.0.0.1, its `reverse_proxy` with its defaults (websockets need no option; it has no
  tunnel-buffer setting, so no bulk variant).
- CPU: utime+stime from `/proc/PID/stat` (the proxy's whole process tree) sampled when the
  generator prints MEASURE_START / MEASURE_END; `proxy_cpu_us` = proxy CPU-µs per operation
  (request, connection, message echoed, idle websocket opened, reconnection) — **lower is
  better**. `*_cpu_pct` = CPU used by that process over the window (100 = one core), and
  `cpu0_busy_pct`/`cpu1_busy_pct` = whole-core busy from `/proc/stat` (includes other load on
  the machine), so a reader can see whether the generator side (CPU 0) saturated. CPU times
  come in 10 ms ticks: short windows (quick mode, idle/storm) are coarse.
- `http_rps`: closed loop of keep-alive `GET /` on {http_conns} connections, one in flight each.
- `ws_connect_rate`: {connect_slots} concurrent slots each repeating connect, websocket handshake,
  one {small_size} B message + echo, close frame, wait for the server's close and FIN.
- `ws_echo_small`: {small_conns} websockets, {small_size} B binary messages, one in flight each.
- `ws_echo_bulk`: {bulk_conns} websockets, {bulk_size} B messages, one in flight each; MB/s of
  payload one way (1 MB = 1e6 B). NGINX runs with `proxy_buffer_size 64k`, HAProxy with
  `tune.bufsize 65536` for this scenario only (the tuned-for-bulk variants of perf-baseline).
- `idle_ws_memory`: {idle_conns} websockets (handshake + one {small_size} B exchange each) opened
  in two halves; `bytes_per_conn` = RSS growth of the proxy between {idle_half} and
  {idle_conns} connections divided by the connections added (each holds 2 fds in the proxy).
  For `direct` the figure is the C backend's RSS growth (there is no proxy).
- `reconnect_storm`: {storm_clients} websockets open; the clients close them (client side, TCP
  close); the bench waits until the proxy (backend for `direct`) has released their fds; then
  all {storm_clients} clients reconnect at once (connect() for all in one loop; each does the
  handshake + one echo; a failed attempt is retried after 10-100 ms). `storm_s` = time until
  the last client had its echo; p50/p99 = per-client time from the storm start.
- `workers_scaling` (**lbproxy only**): the `ws_connect_rate` load against `lbproxy serve
  --workers 1`, then against a fresh `--workers 2` ({duration:g} s each; the workers share
  the listen port with SO_REUSEPORT; one admin API, the supervisor's, for the balancer).
  Nothing is pinned here: lbproxy, the backend and the generator may all run on CPUs 0-1
  (pinning the proxy to one CPU would defeat the purpose). `scaling` = conn/s with 2 workers
  ÷ conn/s with 1; `proxy_cpu_us` = CPU of the whole lbproxy process tree (the supervisor and
  every worker) per connection; `supervisor_cpu_pct_2w` / `supervisor_cpu_us_2w` = the
  supervisor's own CPU over the run (in % of a core / µs per connection: it is never on the
  data path, so near zero); `cpu0/cpu1_busy_pct` = both cores. On 2 cores the generator
  and backend compete with the two workers for the same CPUs, so `scaling` is a **lower
  bound** of what 2 cores dedicated to the proxy would give. `worker_share_min` = the least
  busy worker's share of the connections accepted (0.5 = an even SO_REUSEPORT spread).
  `projected_scaling` = (proxy CPU-µs per connection with 1 worker ÷ with 2 workers) ÷ the
  busier worker's share: what two cores given to the proxy alone would carry at the measured
  per-connection cost — an estimate from measured figures, not a measurement.
- `failover` (every target but `direct`): {failover_conns} websockets, {small_size} B messages,
  one in flight each, through the proxy to two backends (two processes of the C backend; each
  names itself in its 101 with `X-Bench-Backend`). Once every client echoes and
  {failover_warmup:g} s have passed, backend 2 is SIGKILLed; a client whose connection closes
  reconnects after a jittered exponential backoff (attempt n waits U(0.5, 1) x min(1 s,
  {failover_backoff_ms:g} ms x 2^(n-1))). The run ends {failover_after:g} s after the kill once
  every client echoes again (a pair that has not recovered {failover_timeout:g} s after the
  kill fails). Health checking as each one's docs recommend: NGINX OSS passive
  (`max_fails=1 fail_timeout=10s`, `proxy_next_upstream error timeout`), HAProxy active
  (`option httpchk GET /`, `inter 1s fall 2 rise 2`, `retries 2`, `option redispatch 1`),
  Caddy active (`health_uri /`, `health_interval 1s`) plus passive (`fail_duration 10s`,
  `max_fails 1`) with `lb_try_duration 5s` (retries on another upstream), lbproxy its active
  (`check = "http"`, interval 1 s, fall 2) plus passive (`passive_failures = 1`) checks with
  its default `retries`. Metrics: `recover_s` = from the kill until the last client got the
  echo of a message it sent after the kill (every client echoing again); `recover_p50_s` = the
  median of that time over the killed backend's clients; `failed_handshakes` =
  reconnect attempts after the kill that got no 101 (`hs_5xx` + `hs_other_status` +
  `hs_resets`: a 5xx, another status, a reset / EOF / connect error before the response);
  `lost_echoes` = messages sent and never answered on a connection to the surviving backend
  (still outstanding 2 s after the last send on a connection that stayed up, or outstanding
  when the proxy closed such a connection, also counted in `survivor_closed`);
  `in_flight_at_kill` = messages outstanding on connections to the killed backend when they
  closed — lost with the backend, not by the proxy (in a closed loop nearly every connection
  has one); `on_killed` = clients on the killed backend at the kill; `reconnected` = 101s
  after the kill. `msgs_per_s`, p50/p99 and `proxy_cpu_us` (per echo) cover the run from the
  first all-echoing moment to the end, kill included.
- `ws_echo_small_limits` (**lbproxy only**): `ws_echo_small` with the
  `[pools.be.websocket]` pings, message size and rate limits on (values never reached; the
  message metrics are always on), its `proxy_cpu_us` beside the plain `ws_echo_small` run's;
  used only when `lbproxy check-config` accepts those keys — otherwise the run uses the plain
  config and says so (`limits_on` = 0).
- `ws_connect_rate_limits` (**lbproxy only**): `ws_connect_rate` with
  `[listeners.web.limits]` `scope = "redis"` on (limits never reached; a redis-server started
  for the run): the latency and CPU one Redis admission adds to each new connection.
- Each timed scenario measures {duration:g} s after a {warmup:g} s warm-up; `--repeat N` reports
  the median of each metric over N runs.
"""


def write_results_json(out: Path, machine: dict[str, object], outcome: RunOutcome) -> Path:
    path = out / "results.json"
    data = {"machine": machine, "scenarios": outcome.results}
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    (out / "latency_cdf.json").write_text(json.dumps(outcome.cdfs, indent=1) + "\n")
    return path


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def base_metric(metric: str) -> str:
    """``proxy_cpu_us_2w`` -> ``proxy_cpu_us`` (workers_scaling's per-run metrics)."""
    return metric[:-3] if metric.endswith(WORKER_SUFFIXES) else metric


def direction(metric: str) -> str:
    metric = base_metric(metric)
    if metric in HIGHER_BETTER:
        return " ↑"
    if metric in LOWER_BETTER:
        return " ↓"
    return ""


def ratio(row: Metrics | None, other: Metrics | None, metric: str) -> str:
    if row is None or other is None or metric not in row or metric not in other:
        return "—"
    if other[metric] == 0:
        return "—"
    return f"{row[metric] / other[metric]:.2f}"


def lbproxy_only(scenario: str) -> bool:
    return SCENARIO_TARGETS.get(scenario) == ("lbproxy",)


def limits_table(limits: Metrics, plain: Metrics | None) -> list[str]:
    """ws_echo_small_limits (lbproxy only): each metric beside the plain ws_echo_small run's."""
    head = ["metric (lbproxy only)", "ws_echo_small_limits", "ws_echo_small", "limits / plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, value in limits.items():
        other = plain.get(key) if plain else None
        rel = ratio(limits, plain, key) if key in HIGHER_BETTER | LOWER_BETTER else ""
        cells = [fmt(value), fmt(other) if other is not None else "—", rel]
        lines.append(f"| {key}{direction(key)} | " + " | ".join(cells) + " |")
    return lines


def workers_table(metrics: Metrics) -> list[str]:
    """workers_scaling: one row per metric, its value with 1 and with 2 workers side by side."""
    head = ["metric (lbproxy only)", "--workers 1", "--workers 2", "2 workers / 1 worker"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if "scaling" in metrics:
        lines.append(f"| scaling{direction('scaling')} | | | {fmt(metrics['scaling'])} |")
    if "projected_scaling" in metrics:
        value = fmt(metrics["projected_scaling"])
        lines.append(f"| projected_scaling{direction('projected_scaling')} | | | {value} |")
    bases: list[str] = []
    for key in metrics:
        if key.endswith(WORKER_SUFFIXES) and base_metric(key) not in bases:
            bases.append(base_metric(key))
    for base in bases:
        one, two = metrics.get(f"{base}_1w"), metrics.get(f"{base}_2w")
        cells = [fmt(v) if v is not None else "—" for v in (one, two)]
        cells.append(f"{two / one:.2f}" if one and two is not None else "—")
        lines.append(f"| {base}{direction(base)} | " + " | ".join(cells) + " |")
    shown = ("scaling", "projected_scaling")
    rest = [k for k in metrics if k not in shown and not k.endswith(WORKER_SUFFIXES)]
    lines += [f"| {k}{direction(k)} | {fmt(metrics[k])} | | |" for k in rest]
    return lines


def scenario_table(
    scenario: str, per_target: dict[str, Metrics], plain: Metrics | None = None
) -> list[str]:
    """``plain``: lbproxy's ``ws_echo_small`` figures, shown beside ``ws_echo_small_limits``."""
    if scenario == "ws_echo_small_limits":
        return limits_table(per_target.get("lbproxy", {}), plain)
    if lbproxy_only(scenario):
        return workers_table(per_target.get("lbproxy", {}))
    targets = [t for t in TARGETS if t in per_target]
    metrics: list[str] = []
    for t in targets:
        metrics.extend(k for k in per_target[t] if k not in metrics)
    main = MAIN_METRIC[scenario]
    metrics.sort(key=lambda k: (k != main, k not in HIGHER_BETTER | LOWER_BETTER))
    head = ["metric", *targets, *RATIO_HEADS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lb = per_target.get("lbproxy")
    for m in metrics:
        cells = [fmt(per_target[t][m]) if m in per_target[t] else "—" for t in targets]
        ratios = [""] * len(PEERS)  # ratios only where better/worse has a direction
        if m in HIGHER_BETTER | LOWER_BETTER:
            ratios = [ratio(lb, per_target.get(other), m) for other in PEERS]
        lines.append(f"| {m}{direction(m)} | " + " | ".join(cells + ratios) + " |")
    return lines


SUMMARY_METRICS = {
    "workers_scaling": (
        "scaling",
        "projected_scaling",
        "conn_per_s_1w",
        "conn_per_s_2w",
        "proxy_cpu_us_1w",
        "proxy_cpu_us_2w",
        "supervisor_cpu_pct_2w",
    ),
    "failover": (
        "recover_s",
        "recover_p50_s",
        "failed_handshakes",
        "lost_echoes",
        "in_flight_at_kill",
    ),
    "ws_echo_small_limits": ("msgs_per_s", "proxy_cpu_us", "limits_on"),
}


def summary_table(outcome: RunOutcome) -> list[str]:
    head = ["scenario", "metric", *TARGETS, *RATIO_HEADS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scenario, per_target in outcome.results.items():
        for metric in SUMMARY_METRICS.get(scenario, (MAIN_METRIC[scenario], "proxy_cpu_us")):
            if not any(metric in m for m in per_target.values()):
                continue
            cells = [
                fmt(per_target[t][metric]) if metric in per_target.get(t, {}) else "—"
                for t in TARGETS
            ]
            lb = per_target.get("lbproxy")
            ratios = [ratio(lb, per_target.get(peer), metric) for peer in PEERS]
            if metric not in HIGHER_BETTER | LOWER_BETTER:
                ratios = [""] * len(PEERS)
            if lbproxy_only(scenario):
                ratios = ["lbproxy only"] * len(PEERS)
            lines.append(
                f"| {scenario} | {metric}{direction(metric)} | " + " | ".join(cells + ratios) + " |"
            )
    return lines


def copy_configs(outcome: RunOutcome, out: Path) -> list[Path]:
    conf_dir = out / "configs"
    conf_dir.mkdir(exist_ok=True)
    copied = []
    for name, src in sorted(outcome.configs.items()):
        if src.exists():
            copied.append(Path(shutil.copyfile(src, conf_dir / name)))
    return copied


def method_text(settings: Settings) -> str:
    return METHOD.format(idle_half=settings.idle_conns // 2, **vars(settings))


def load_warning(machine: dict[str, object]) -> list[str]:
    """A warning when other work was running before the bench started.

    Only the load average at the start says that: the bench itself keeps both CPUs busy
    (proxy on one, generator and backend on the other), so the load at the end is ~2 by design.
    """
    start = machine.get("load_avg_start")
    if not (isinstance(start, list) and start and start[0] > QUIET_LOAD):
        return []
    return [
        f"**Warning: the machine was not quiet** (1-min load average {start} when the bench "
        f"started; quiet means below {QUIET_LOAD}). Other processes shared the CPUs, so "
        "throughput is low and noisy; CPU-µs per operation is the more stable figure. "
        "Re-run on a quiet machine (e.g. with `--repeat 3`) before quoting numbers.",
        "",
    ]


def write_report(
    out: Path,
    machine: dict[str, object],
    outcome: RunOutcome,
    settings: Settings,
    plots: list[Path],
    configs: list[Path],
) -> Path:
    lines = ["# lbproxy side-by-side benchmark", "", f"Command: `{machine['command']}`", ""]
    lines += load_warning(machine)
    lines += ["## Machine", "", "| key | value |", "|---|---|"]
    lines += [
        f"| {k} | {json.dumps(v) if isinstance(v, dict | list) else v} |"
        for k, v in machine.items()
    ]
    lines += ["", "## Method", "", method_text(settings)]
    lines += [
        "## Summary",
        "",
        "↑ higher is better, ↓ lower is better. Ratios are lbproxy's value divided by the "
        "other's: for throughput above 1 means lbproxy is faster; for CPU-µs per op, latency, "
        "memory, storm and recovery time **below 1 means lbproxy is better (lower is better)**.",
        "",
    ]
    lines += summary_table(outcome)
    plain = outcome.results.get("ws_echo_small", {}).get("lbproxy")
    for scenario, per_target in outcome.results.items():
        lines += ["", f"## {scenario}", "", *scenario_table(scenario, per_target, plain)]
        for target, notes in outcome.notes.get(scenario, {}).items():
            lines += [f"- note ({target}): {n}" for n in notes]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if outcome.failures:
        lines += ["", "## Failures", ""] + [f"- {f.splitlines()[0]}" for f in outcome.failures]
    lines += [
        "",
        "## Configs used",
        "",
        "Generated from `bench/templates/` (ports differ per run); copies in `configs/`.",
        "",
    ]
    for conf in configs:
        lines += [f"### {conf.name}", "", "```", conf.read_text().rstrip(), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
