"""``failover``: websockets echoing through the proxy to two backends; one is SIGKILLed mid-run.

The C load generator (``loadgen -m failover``, see its header for the exact definitions) keeps
``failover_conns`` websockets echoing, each sending its next message ``failover_pace_ms``
after its previous one (a paced load, not a saturating closed loop); each backend names
itself in its 101 (``backend -i 1`` / ``-i 2``), so the generator knows which clients sat on
the killed one.
Once every client echoes it prints ``READY``; the bench writes ``KILL 2 PID`` and the
generator takes the kill time, counts the clients on each backend, then SIGKILLs backend 2 (a
separate process, PID) itself, so that no close can be seen before the kill time. Clients
whose connection closes reconnect after a jittered exponential backoff. Metrics (all counts
are integers):

- ``recover_s``: from the kill until the last client got the echo of a message it sent after
  the kill (every client echoing again);
- ``recover_p50_s``: the median of that time over the clients of the killed backend;
- ``failed_handshakes``: reconnect attempts after the kill that got no 101 (a 5xx, another
  status, or a reset / EOF / connect error first): ``hs_5xx`` + ``hs_other_status`` +
  ``hs_resets``;
- ``in_flight_at_kill``: messages outstanding on connections to the killed backend when they
  closed (lost with the backend, not by the proxy);
- ``lost_echoes``: messages sent and never answered on connections to the surviving backend:
  still outstanding 2 s after the last send on a connection that stayed up, or outstanding
  when the proxy closed such a connection (``survivor_closed`` counts those closes);
- ``on_killed`` / ``on_survivor``: clients on each backend at the kill; ``killed_closed``,
  ``reconnected`` (101s after the kill); ``msgs_per_s`` / ``p50_ms`` / ``p99_ms`` of the echoes
  from READY to the end; ``errors``: failures before the kill (both backends up).
"""

from __future__ import annotations

from bench.procs import take_sample
from bench.stage import WS_PATH, Metrics, ScenarioResult, Stage, cpu_metrics, num, parse_result

KILLED_ID = 2  # the backend started with -i 2 is the one killed
COUNTS = (
    "failed_handshakes",
    "hs_5xx",
    "hs_other_status",
    "hs_resets",
    "lost_echoes",
    "in_flight_at_kill",
    "survivor_closed",
    "killed_closed",
    "reconnected",
    "on_killed",
    "on_survivor",
    "errors",
)


def parse_ready(line: str) -> tuple[int, int, int]:
    """``READY echoing on1 on2`` -> (clients echoing, on backend 1, on backend 2)."""
    parts = line.split()
    if len(parts) != 4 or parts[0] != "READY":
        raise ValueError(f"bad failover READY line: {line!r}")
    echoing, on1, on2 = (int(p) for p in parts[1:])
    return echoing, on1, on2


def failover_metrics(res: dict[str, object], clients: int) -> Metrics:
    """The failover metrics from the generator's RESULT; raises when the run says nothing
    (the kill was never seen, or not every client echoed again before the time limit)."""
    if not num(res, "killed"):
        raise RuntimeError("failover: the generator never saw the kill")
    recovered = int(num(res, "recovered"))
    if num(res, "recover_s") < 0 or recovered != clients:
        raise RuntimeError(
            f"failover: only {recovered} of {clients} clients echoed again before the limit "
            f"(failed_handshakes={num(res, 'failed_handshakes'):g}, "
            f"lost_echoes={num(res, 'lost_echoes'):g})"
        )
    metrics: Metrics = {
        "recover_s": round(num(res, "recover_s"), 4),
        "recover_p50_s": round(num(res, "recover_p50_s"), 4),
    }
    metrics.update({key: num(res, key) for key in COUNTS})
    parts = metrics["hs_5xx"] + metrics["hs_other_status"] + metrics["hs_resets"]
    if parts != metrics["failed_handshakes"]:
        raise ValueError(f"failover: failed_handshakes {metrics['failed_handshakes']} != {parts}")
    metrics["msgs_per_s"] = num(res, "ops_per_s")
    metrics["p50_ms"] = num(res, "p50_us") / 1000.0
    metrics["p99_ms"] = num(res, "p99_us") / 1000.0
    return metrics


def failover(stage: Stage) -> ScenarioResult:
    s = stage.settings
    if stage.backend2 is None:
        raise RuntimeError("failover: the second backend was not started")
    gen = stage.generator(
        "failover",
        *("-c", str(s.failover_conns), "-s", str(s.small_size), "-u", WS_PATH),
        *("-k", str(s.open_concurrency), "-W", str(s.failover_warmup)),
        *("-d", str(s.failover_after), "-R", str(s.failover_timeout)),
        *("-b", str(s.failover_backoff_ms), "-r", str(s.failover_pace_ms)),
        alarm=s.failover_timeout + 120,
    )
    echoing, on1, on2 = parse_ready(gen.expect("READY ", timeout=90))
    if echoing != s.failover_conns or not on1 or not on2:
        raise RuntimeError(
            f"failover: before the kill {echoing} of {s.failover_conns} clients echoing "
            f"({on1} on backend 1, {on2} on backend 2): both must carry clients"
        )
    groups = stage.groups(gen)
    s0 = take_sample(groups)
    # the generator takes the kill time, then SIGKILLs the backend itself (no race between
    # the kill and the generator learning of it)
    gen.send_line(f"KILL {KILLED_ID} {stage.backend2.pid}")
    res = parse_result(gen.expect("RESULT ", timeout=s.failover_timeout + 30))
    s1 = take_sample(groups)
    if stage.backend2.alive():
        raise RuntimeError("failover: backend 2 survived the SIGKILL")
    metrics = failover_metrics(res, s.failover_conns)
    cpu = cpu_metrics(s0, s1, num(res, "ops"))  # backend_*: only the survivor is counted: drop
    metrics.update({k: v for k, v in cpu.items() if not k.startswith("backend_")})
    notes = [f"{on2} of {echoing} clients were on the killed backend"]
    return ScenarioResult(metrics, None, notes)
