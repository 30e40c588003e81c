"""`serve --workers N`: N worker processes sharing each listen port with SO_REUSEPORT.

The parent does no proxying. It starts the workers, forwards SIGTERM/SIGINT
(graceful drain) and SIGHUP (reload; the config is validated first so a bad file
is reported once and never reaches the workers), and replaces a worker that
dies unexpectedly. Each worker is a complete lbproxy with its own pools, health
checks and counters; worker k serves its admin API on admin.listen's port + k.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from types import FrameType

from lbproxy.config import load_config
from lbproxy.errors import ConfigError

log = logging.getLogger("lbproxy.workers")


def _spawn(path: str, index: int, log_level: str, log_format: str) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "lbproxy",
        "serve",
        "--config",
        path,
        "--worker-index",
        str(index),
        "--log-level",
        log_level,
        "--log-format",
        log_format,
    ]
    return subprocess.Popen(args)


def run_workers(path: str, count: int, log_level: str, log_format: str) -> int:
    procs = [_spawn(path, i, log_level, log_format) for i in range(count)]
    stopping = False

    def forward(sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if sig == signal.SIGHUP:
            try:
                load_config(path)
            except ConfigError as exc:
                for line in exc.problems:
                    log.error("reload rejected: %s", line)
                return
        else:
            stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log.warning("started %d workers: %s", count, ", ".join(str(p.pid) for p in procs))
    restarts: list[float] = []
    while True:
        alive = False
        for i, proc in enumerate(procs):
            code = proc.poll()
            if code is None:
                alive = True
                continue
            if stopping:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > 10 * count:
                log.error("workers keep dying; giving up")
                stopping = True
                for other in procs:
                    if other.poll() is None:
                        other.terminate()
                continue
            log.error("worker %d (pid %d) exited with %s; replacing it", i, proc.pid, code)
            procs[i] = _spawn(path, i, log_level, log_format)
            alive = True
        if not alive and stopping:
            return 0
        time.sleep(0.1)
