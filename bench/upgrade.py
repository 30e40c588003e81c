"""``upgrade`` (lbproxy only): ``lbproxy upgrade`` under load, ``serve --workers 2``.

``upgrade_idle`` idle websockets (the C load generator's ``idle`` mode) plus
``upgrade_echo`` websockets echoing in a closed loop (``echo`` mode, depth 1) go through
lbproxy; a quarter into the echo window the bench asks ``POST /api/upgrade``. Metrics:

- ``handover_s``: the old workers' hand-over (listening sockets and every tunnel sent),
  the longest of the two; ``upgrade_s``: the whole upgrade as answered (pre-flight of the
  new code and the new workers' start included);
- ``longest_pause_ms``: the longest round trip one echoing client saw over the window
  (the echo loop never stops: a pause during the hand-over shows here);
- ``moved``: tunnels handed over; ``held_after``: connections the new generation holds
  (``GET /api/info``); ``idle_dropped``: idle websockets closed by the proxy (seen by the
  generator before it closed them itself); ``echo_errors``, ``idle_errors``;
- ``same_pid``: 1 when the supervisor's PID did not change.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import replace

from bench.procs import http_get, poll_until
from bench.stage import WS_PATH, Launched, Metrics, ScenarioResult, Stage, num, parse_result


def post_upgrade(admin: int, timeout: float = 120.0) -> dict[str, object]:
    """POST /api/upgrade; its JSON answer (RuntimeError unless a 200)."""
    with socket.create_connection(("127.0.0.1", admin), timeout=timeout) as sock:
        sock.sendall(
            b"POST /api/upgrade HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n"
        )
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"upgrade refused: {raw[:300]!r}")
    document = json.loads(body)
    assert isinstance(document, dict)
    return document


def info(admin: int) -> dict[str, object]:
    body = http_get(admin, "/api/info")
    if not body.startswith(b"HTTP/1.1 200"):
        return {}
    document = json.loads(body.split(b"\r\n\r\n", 1)[1])
    return document if isinstance(document, dict) else {}


def measure(stage: Stage, run: Launched) -> ScenarioResult:
    s = stage.settings
    sub = replace(stage, port=run.port, proxy=run.child)
    admin = run.admin_ports[0]
    idle = sub.generator(
        "idle",
        *("-c", str(s.upgrade_idle), "-P", "1", "-s", str(s.small_size)),
        *("-k", str(s.open_concurrency), "-u", WS_PATH),
    )
    opened = int(idle.expect("PHASE 1 ", timeout=150).split()[3])
    window = max(s.duration, 4.0)
    echo = sub.generator(
        "echo", "-c", str(s.upgrade_echo), "-s", str(s.small_size), "-d", str(window), "-u", WS_PATH
    )
    echo.expect("MEASURE_START", timeout=60)
    time.sleep(window / 4)
    answer = post_upgrade(admin)
    res = parse_result(echo.expect("RESULT ", timeout=window + 60))
    generation = int(answer["generation"])  # type: ignore[call-overload]
    if not poll_until(lambda: info(admin).get("generation") == generation, timeout=30):
        raise RuntimeError(f"generation {generation} never answered:\n{run.child.log_tail()}")
    now = info(admin)
    held = sum(int(w["connections"]) for w in now["workers"])  # type: ignore[attr-defined]
    idle.send_line()
    ires = parse_result(idle.expect("RESULT ", timeout=60))
    metrics: Metrics = {
        "handover_s": float(answer["handover_seconds"]),  # type: ignore[arg-type]
        "upgrade_s": float(answer["seconds"]),  # type: ignore[arg-type]
        "longest_pause_ms": num(res, "max_us") / 1000.0,
        "p50_ms": num(res, "p50_us") / 1000.0,
        "p99_ms": num(res, "p99_us") / 1000.0,
        "moved": float(answer["moved"]),  # type: ignore[arg-type]
        "idle_open": float(opened),
        "echoing": float(s.upgrade_echo),
        "held_after": float(held),
        "idle_dropped": num(ires, "dropped"),
        "idle_errors": num(ires, "errors"),
        "echo_errors": num(res, "errors"),
        "same_pid": 1.0 if now.get("pid") == run.child.pid else 0.0,
    }
    return ScenarioResult(metrics, None, [f"{opened} idle + {s.upgrade_echo} echoing websockets"])


def upgrade(stage: Stage) -> ScenarioResult:
    if stage.launch is None:
        raise RuntimeError("upgrade starts lbproxy itself: the stage has no launcher")
    run = stage.launch(2)
    try:
        return measure(stage, run)
    finally:
        run.child.stop()
