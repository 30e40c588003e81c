"""`lbproxy demo`: Redis + three self-registering chat backends + lbproxy, on this machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_CONFIG = """\
# Written by `lbproxy demo`.
[admin]
listen = "127.0.0.1:{admin}"

[redis]
url = "redis://127.0.0.1:{redis}/0"
prefix = "lbproxy-demo"

[listeners.public]
bind = "127.0.0.1:{public}"
mode = "http"
pool = "chat"

[pools.chat]
balance = "hash"
hash_key = "cookie:lbid"
sticky_cookie = true
discovery = "redis"
drain_timeout = 5.0
close_spread = 2.0
allowed_networks = ["127.0.0.0/8"]

[pools.chat.health]
check = "http"
path = "/healthz"
interval = 1.0
"""


_LBPROXY = (sys.executable, "-m", "lbproxy")  # how the demo runs its own subcommands


def _port(preferred: int) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port."""
    for candidate in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


def _start_redis(exe: str, workdir: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    """A redis-server on a free port with its files in ``workdir``; its port."""
    port = _port(0)
    redis = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",  # chat history and epochs survive a Redis restart
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    procs.append(redis)
    _wait_port(port, redis, "redis-server")
    return port


def _start_backends(redis_url: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """Three chat backends registering themselves in the ``chat`` pool."""
    for i in range(1, 4):
        port = _port(9000 + i)
        backend = subprocess.Popen(
            [
                *_LBPROXY,
                "backend",
                "--listen",
                f"127.0.0.1:{port}",
                "--id",
                f"chat-{i}",
                "--redis",
                redis_url,
                "--prefix",
                "lbproxy-demo",
                "--pool",
                "chat",
                "--log-level",
                "warning",
            ]
        )
        procs.append(backend)
        _wait_port(port, backend, f"backend chat-{i}")


def _announce(public: int, admin: int, redis_url: str, config: Path) -> None:
    print(
        "\nlbproxy demo is running:\n"
        f"  chat page (through lbproxy): http://127.0.0.1:{public}/\n"
        f"  public websocket endpoint:   ws://127.0.0.1:{public}/chat?user=NAME\n"
        f"  dashboard:                   http://127.0.0.1:{admin}/\n"
        f"  metrics:                     http://127.0.0.1:{admin}/metrics\n"
        f"  redis:                       {redis_url}\n"
        f"  config:                      {config}\n"
        f"Try: lbproxy status --admin http://127.0.0.1:{admin}\n"
        f"     lbproxy drain chat chat-1 --admin http://127.0.0.1:{admin}\n"
        "Ctrl-C stops everything.\n",
        flush=True,
    )


def _wait_for_stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Until SIGINT/SIGTERM, or until one of the demo's processes exits."""
    stop = {"now": False}

    def on_signal(_sig: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop["now"]:
        if any(p.poll() is not None for p in procs):
            print("a demo process exited; stopping", file=sys.stderr)
            break
        time.sleep(0.2)


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_demo() -> int:
    redis_exe = shutil.which("redis-server")
    if redis_exe is None:
        print(
            "lbproxy demo needs redis-server on PATH (apt-get install redis-server)",
            file=sys.stderr,
        )
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="lbproxy-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_port = _start_redis(redis_exe, workdir, procs)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        _start_backends(redis_url, procs)
        public, admin = _port(8080), _port(9901)
        config = workdir / "lbproxy.toml"
        config.write_text(DEMO_CONFIG.format(admin=admin, redis=redis_port, public=public))
        serve = [*_LBPROXY, "serve", "--config", str(config), "--log-level", "warning"]
        proxy = subprocess.Popen(serve)
        procs.append(proxy)
        _wait_port(public, proxy, "lbproxy")
        _announce(public, admin, redis_url, config)
        _wait_for_stop(procs)
        return 0
    finally:
        _stop_all(procs)
        shutil.rmtree(workdir, ignore_errors=True)
        if os.environ.get("LBPROXY_DEMO_DEBUG"):
            print(f"demo workdir was {workdir}", file=sys.stderr)
