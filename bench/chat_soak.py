"""The chat fault run: protocol-following clients through lbproxy while backends and Redis fail.

    python -m bench.chat_soak --clients 60 --rate 20 --duration 40 \\
        --faults kill,drain,stop,redis

Starts a redis-server (AOF on), ``--backends`` reference backends registering themselves in
it, and an ``lbproxy serve`` in front of them (Redis discovery, HTTP health checks); then
``--clients`` clients (rooms of ``--room-size``), each sending ``--rate`` messages per second
for ``--duration`` seconds, while the faults happen in order, evenly spread over the run:

- ``kill``: SIGKILL of a backend (started again 2 s later);
- ``drain``: an admin drain of a backend (enabled again 3 s later);
- ``stop``: SIGSTOP of a backend for ``--stop-seconds`` (then SIGCONT);
- ``redis``: a Redis restart (SIGTERM, down for 0.5 s, then the same port and AOF directory
  again).

Then every client gets until ``--settle`` seconds to receive what was acknowledged, and the
tally is printed as JSON: lost, duplicated (by client_msg_id) and reordered must all be 0
(exit status 1 otherwise). Processes are stopped by PID at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import BOTH_CPUS, Child, ChildSet, free_port, http_get_ok, port_open
from bench.soak_client import ClientConfig, SoakClient, Tally, missing, tally

FAULTS = ("kill", "drain", "stop", "redis")
REDIS_DOWN = 0.5  # seconds Redis stays down in the "redis" fault
PREFIX = "soak"

LBPROXY_CONFIG = """\
[admin]
listen = "127.0.0.1:{admin}"
[redis]
url = "redis://127.0.0.1:{redis}/0"
prefix = "{prefix}"
[listeners.public]
bind = "127.0.0.1:{port}"
pool = "chat"
[pools.chat]
balance = "least-connections"
discovery = "redis"
allowed_networks = ["127.0.0.0/8"]
connect_timeout = 1.0
retries = 2
drain_timeout = 0.5
close_spread = 0.2
[pools.chat.health]
check = "http"
path = "/healthz"
interval = 0.3
timeout = 0.5
rise = 2
fall = 2
"""


@dataclass(frozen=True)
class Params:
    clients: int = 60
    rate: float = 20.0
    duration: float = 40.0
    backends: int = 3
    room_size: int = 6
    faults: tuple[str, ...] = FAULTS
    stop_seconds: float = 5.0
    settle: float = 30.0
    ping_interval: float = 1.0  # 2 unanswered: a dead connection (a SIGSTOP is found in ~3 s)


@dataclass
class Result:
    params: Params
    tally: Tally
    faults: list[tuple[float, str]] = field(default_factory=list)  # (seconds into the run, what)

    @property
    def ok(self) -> bool:
        return self.tally.lost == self.tally.duplicated == self.tally.reordered == 0

    def as_json(self) -> str:
        body = {
            "params": dataclasses.asdict(self.params),
            "faults": self.faults,
            **dataclasses.asdict(self.tally),
            "ok": self.ok,
        }
        return json.dumps(body, indent=2)


class Cluster:
    """redis-server, the backends and lbproxy, as children of one ChildSet."""

    def __init__(self, children: ChildSet, workdir: Path, backends: int) -> None:
        self.children = children
        self.workdir = workdir
        self.redis_port, self.port, self.admin = free_port(), free_port(), free_port()
        self.backend_ports = {f"b{i}": free_port() for i in range(1, backends + 1)}
        self.procs: dict[str, Child] = {}

    def start(self) -> None:
        self.start_redis()
        for backend_id in self.backend_ports:
            self.start_backend(backend_id, ready=False)  # all at once, then wait for each
        for backend_id, port in self.backend_ports.items():
            wait(lambda p=port: http_get_ok(p, "/healthz"), 15, f"backend {backend_id} serving")
        config = self.workdir / "lbproxy.toml"
        text = LBPROXY_CONFIG.format(
            admin=self.admin, redis=self.redis_port, prefix=PREFIX, port=self.port
        )
        config.write_text(text)
        args = [sys.executable, "-m", "lbproxy", "serve", "--config", str(config)]
        self.procs["lbproxy"] = self.children.start("lbproxy", args, BOTH_CPUS)
        wait(lambda: self.states() == dict.fromkeys(self.backend_ports, "up"), 20, "pool up")
        wait(lambda: http_get_ok(self.port, "/healthz"), 10, "lbproxy serving")

    def start_redis(self) -> None:
        exe = shutil.which("redis-server") or "redis-server"
        args = [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--dir", str(self.workdir), "--daemonize", "no"]
        self.procs["redis"] = self.children.start("redis", args, BOTH_CPUS)
        wait(lambda: port_open(self.redis_port), 15, "redis-server listening")

    def start_backend(self, backend_id: str, ready: bool = True) -> None:
        port = self.backend_ports[backend_id]
        args = [sys.executable, "-m", "lbproxy", "backend", "--listen", f"127.0.0.1:{port}"]
        args += ["--id", backend_id, "--redis", f"redis://127.0.0.1:{self.redis_port}/0"]
        args += ["--prefix", PREFIX, "--rate", "1000", "--burst", "1000", "--ttl", "6"]
        args += ["--drain-seconds", "1", "--log-level", "warning"]
        self.procs[backend_id] = self.children.start(backend_id, args, BOTH_CPUS)
        if ready:
            wait(lambda: http_get_ok(port, "/healthz"), 15, f"backend {backend_id} serving")

    def states(self) -> dict[str, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/api/pools", timeout=2) as r:
                body = json.load(r)
        except OSError:
            return {}
        return {b["id"]: b["state"] for b in body["pools"]["chat"]["backends"]}

    def admin_post(self, path: str) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}", method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)


def wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for: {what}")
        time.sleep(0.05)


async def fault(cluster: Cluster, kind: str, target: str, stop_seconds: float) -> None:
    """One fault, and the repair after it (run in a thread: process calls block)."""
    if kind == "kill":
        cluster.signal(target, signal.SIGKILL)
        await asyncio.to_thread(cluster.procs[target].popen.wait, 10)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(cluster.start_backend, target)
    elif kind == "drain":
        await asyncio.to_thread(cluster.admin_post, f"/api/pools/chat/backends/{target}/drain")
        await asyncio.sleep(3.0)
        await asyncio.to_thread(cluster.admin_post, f"/api/pools/chat/backends/{target}/enable")
    elif kind == "stop":
        cluster.signal(target, signal.SIGSTOP)
        try:
            await asyncio.sleep(stop_seconds)
        finally:
            cluster.signal(target, signal.SIGCONT)
    elif kind == "redis":
        cluster.signal("redis", signal.SIGTERM)  # AOF written and fsynced on shutdown
        await asyncio.to_thread(cluster.procs["redis"].popen.wait, 15)
        await asyncio.sleep(REDIS_DOWN)  # (an outage every client sees, not a blink)
        await asyncio.to_thread(cluster.start_redis)
    else:
        raise ValueError(f"unknown fault {kind!r}")


async def drive(cluster: Cluster, params: Params) -> Result:
    url = f"ws://127.0.0.1:{cluster.port}"
    clients = [
        SoakClient(
            f"u{i}",
            ClientConfig(url, f"room{i // params.room_size}", params.rate, params.ping_interval),
        )
        for i in range(params.clients)
    ]
    stop = asyncio.Event()
    runs = [asyncio.create_task(c.run(stop)) for c in clients]
    result = Result(params, tally(clients))
    started = time.monotonic()
    targets = list(cluster.backend_ports)
    try:
        step = params.duration / (len(params.faults) + 1)
        for n, kind in enumerate(params.faults):
            await asyncio.sleep(max(0.0, started + step * (n + 1) - time.monotonic()))
            target = targets[n % len(targets)]
            result.faults.append((round(time.monotonic() - started, 2), f"{kind} {target}"))
            await fault(cluster, kind, target, params.stop_seconds)
        await asyncio.sleep(max(0.0, started + params.duration - time.monotonic()))
        for c in clients:
            c.sending = False
        deadline = time.monotonic() + params.settle
        while time.monotonic() < deadline and not (
            all(c.done_sending() for c in clients) and missing(clients) == 0
        ):
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
    result.tally = tally(clients)
    return result


async def run_soak(params: Params, workdir: Path | None = None) -> Result:
    """The whole run; every process it started is stopped when it returns or raises."""
    with _workdir(workdir) as path, ChildSet(path) as children:
        cluster = Cluster(children, path, params.backends)
        await asyncio.to_thread(cluster.start)
        try:
            return await drive(cluster, params)
        finally:
            with contextlib.suppress(ProcessLookupError, KeyError):
                for name in cluster.backend_ports:
                    cluster.signal(name, signal.SIGCONT)


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="lbproxy-soak-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> tuple[Params, Path | None]:
    p = argparse.ArgumentParser(prog="python -m bench.chat_soak", description=__doc__)
    d = Params()
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--rate", type=float, default=d.rate, help="messages/s per client")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of sending")
    p.add_argument("--backends", type=int, default=d.backends)
    p.add_argument("--room-size", type=int, default=d.room_size)
    p.add_argument("--faults", default=",".join(d.faults), help=f"in order, from {FAULTS}")
    p.add_argument("--stop-seconds", type=float, default=d.stop_seconds)
    p.add_argument("--settle", type=float, default=d.settle)
    p.add_argument("--ping-interval", type=float, default=d.ping_interval)
    p.add_argument("--logs", type=Path, default=None, help="keep the process logs here")
    a = p.parse_args(argv)
    faults = tuple(f for f in a.faults.split(",") if f)
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        p.error(f"--faults: unknown {bad}; choose from {FAULTS}")
    params = Params(
        a.clients, a.rate, a.duration, a.backends, a.room_size, faults, a.stop_seconds, a.settle
    )
    return dataclasses.replace(params, ping_interval=a.ping_interval), a.logs


def main(argv: list[str] | None = None) -> int:
    params, logs = parse_args(argv)
    result = asyncio.run(run_soak(params, logs))
    print(result.as_json())
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
