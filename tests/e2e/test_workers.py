"""`serve --workers 2` is one balancer: one admin API, shared counts, drain everywhere,
health checks once, a killed worker replaced (real lbproxy subprocesses, real backends)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from lbproxy import __version__
from tests.support import (
    Backend,
    Lbproxy,
    RedisServer,
    await_until,
    free_port,
    lbproxy_cmd,
    port_open,
    wait_until,
)
from tests.support.config import proxy_config

pytestmark = pytest.mark.timeout(60)


def _get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)


def _active(admin: int) -> dict[str, int]:
    backends = _get(admin, "/api/pools").json()["pools"]["main"]["backends"]
    return {b["id"]: b["active"] for b in backends}


def _own_counts(*backends: Backend) -> dict[str, int]:
    """What each backend itself counts (its /whoami, asked directly, not through lbproxy)."""
    return {b.id: int(_get(b.port, "/whoami").json()["connections"]) for b in backends}


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def _exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie (not reaped by the test's subprocess) has exited


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lbproxy_cmd(*args), capture_output=True, text=True, timeout=30)


async def _open(port: int, count: int) -> list[ClientConnection]:
    conns = [await ws_connect(f"ws://127.0.0.1:{port}/echo") for _ in range(count)]
    for conn in conns:  # each one through to its backend
        await conn.send("hi")
        assert await asyncio.wait_for(conn.recv(), 5) == "hi"
    return conns


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[tuple[Lbproxy, int, int, Backend, Backend]]:
    one, two = Backend("w1").start(), Backend("w2").start()
    try:
        text, port, admin = proxy_config(
            [(one.id, one.address), (two.id, two.address)],
            pool={"drain_timeout": 0.0, "close_spread": 0.3},
        )
        lb = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port,))
        try:
            wait_until(lambda: len(_get(admin, "/api/info").json()["workers"]) == 2, timeout=20)
            yield lb, port, admin, one, two
        finally:
            lb.stop()
    finally:
        one.stop()
        two.stop()


async def test_one_admin_view_drain_everywhere_and_a_killed_worker(
    balancer: tuple[Lbproxy, int, int, Backend, Backend],
) -> None:
    lb, port, admin, one, two = balancer
    info = _get(admin, "/api/info").json()
    assert info["version"] == __version__ and info["pid"] == lb.pid
    assert info["generation"] == 1 and info["started"] <= time.time()
    pids = [w["pid"] for w in info["workers"]]
    assert sorted(pids) == _children(lb.pid)  # the supervisor's own children

    conns = await _open(port, 40)
    # the one admin port counts every worker's connections, as the backends do
    await await_until(lambda: _active(admin) == _own_counts(one, two), timeout=10)
    assert sum(_active(admin).values()) == 40
    # least-connections on the shared counts: even across the backends whichever worker picks
    assert abs(_active(admin)["w1"] - _active(admin)["w2"]) <= 4
    held = [w["connections"] for w in _get(admin, "/api/info").json()["workers"]]
    assert sum(held) == 40 and min(held) > 0  # both workers hold some

    on_one = _active(admin)["w1"]
    drained = _cli("drain", "main", "w1", "--admin", f"http://127.0.0.1:{admin}")
    assert drained.returncode == 0, drained.stderr
    await await_until(lambda: sum(c.state is State.CLOSED for c in conns) >= on_one)
    closed = [c for c in conns if c.state is State.CLOSED]
    assert len(closed) == on_one and {c.close_code for c in closed} == {1001}
    alive = [c for c in conns if c.state is State.OPEN]
    assert all(await asyncio.gather(*(_echo_alive(c) for c in alive)))  # w2's: untouched
    for _ in range(20):  # new connections, spread by the kernel over both workers
        assert _get(port, "/whoami").json()["id"] == "w2"
    status = _cli("status", "--admin", f"http://127.0.0.1:{admin}")
    assert status.returncode == 0 and "draining" in status.stdout, status.stdout
    assert _cli("enable", "main", "w1", "--admin", f"http://127.0.0.1:{admin}").returncode == 0
    await await_until(lambda: _get(port, "/whoami").json()["id"] == "w1", timeout=10)

    # SIGKILL one worker: replaced within 2 s; what it held stops counting at once
    victim = _get(admin, "/api/info").json()["workers"][0]
    assert victim["connections"] > 0
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()

    def replacement() -> dict[str, int] | None:
        now = _get(admin, "/api/info").json()["workers"]
        fresh = [w for w in now if w["pid"] != victim["pid"] and w["pid"] not in pids]
        return fresh[0] if fresh and len(now) == 2 else None

    fresh = await await_until(replacement, timeout=5, interval=0.02)
    assert time.monotonic() - killed < 2.0
    # the dead worker's row was released before its replacement even started
    assert fresh["connections"] == 0  # type: ignore[index]
    results = await asyncio.gather(*(_echo_alive(c) for c in alive))
    survivors = sum(results)
    assert 0 < survivors < len(alive)  # the other worker's clients are unaffected
    await await_until(lambda: _active(admin) == _own_counts(one, two), timeout=10)
    assert sum(_active(admin).values()) == survivors
    for conn in conns:
        await conn.close()


async def _echo_alive(conn: ClientConnection) -> bool:
    try:
        await conn.send("still")
        return bool(await asyncio.wait_for(conn.recv(), 5) == "still")
    except (ConnectionClosed, TimeoutError):
        return False


class _Checked(BaseHTTPRequestHandler):
    hits: list[float]

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.hits.append(time.monotonic())
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_health_checks_once_per_interval_for_the_balancer(tmp_path: Path) -> None:
    hits: list[float] = []
    handler = type("Handler", (_Checked,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        interval = 0.2
        health = {"check": "http", "path": "/healthz", "interval": interval, "timeout": 1.0}
        text, port, admin = proxy_config([("c1", address)], health=health)
        lb = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port,))
        try:
            wait_until(lambda: len(_get(admin, "/api/info").json()["workers"]) == 2, timeout=20)
            start = time.monotonic()
            wait_until(lambda: time.monotonic() - start >= 2.5, timeout=5, interval=0.1)
            window = [t for t in hits if start <= t < start + 2.5]
            rate = len(window) / 2.5
            assert rate == pytest.approx(1 / interval, rel=0.3), (rate, len(hits))
            # the supervisor killed: its workers exit rather than run unsupervised
            children = _children(lb.pid)
            assert len(children) == 2
            os.kill(lb.pid, signal.SIGKILL)
            wait_until(lambda: not any(_exists(p) for p in children), timeout=10)
            wait_until(lambda: not port_open(port), timeout=5)  # no orphan keeps the port
        finally:
            lb.stop()
    finally:
        server.shutdown()
        server.server_close()


def test_one_worker_is_one_process_as_before(tmp_path: Path) -> None:
    backend = Backend("o1").start()
    try:
        text, port, admin = proxy_config([(backend.id, backend.address)])
        lb = Lbproxy(text, tmp_path, "--workers", "1").start(wait_ports=(port,))
        try:
            wait_until(lambda: _get(admin, "/healthz").status_code == 200)
            info = _get(admin, "/api/info").json()
            assert info["pid"] == lb.pid and [w["pid"] for w in info["workers"]] == [lb.pid]
            assert _children(lb.pid) == []  # no supervisor, no worker: one process
            assert _get(port, "/whoami").json()["id"] == "o1"
        finally:
            lb.stop()
    finally:
        backend.stop()


def test_one_registry_watcher_for_the_balancer(redis: RedisServer, tmp_path: Path) -> None:
    import redis as redis_py

    from lbproxy.registry.schema import events_channel
    from tests.e2e.test_discovery_e2e import config, members, register

    backends = [Backend(f"q{i}").start() for i in (1, 2)]
    regs = [register(redis, b) for b in backends]
    try:
        text, port, admin = config(redis.url)
        lb = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port,))
        try:
            wait_until(lambda: len(members(admin)) == 2, timeout=15)
            client = redis_py.Redis.from_url(redis.url)
            subscribers = dict(client.pubsub_numsub(events_channel("e2e")))
            assert subscribers[events_channel("e2e").encode()] == 1  # the supervisor's only
            client.close()
            assert lb.proc is not None
            try:
                wait_until(lambda: _get(port, "/whoami").status_code == 200, timeout=10)
            except AssertionError:
                raise AssertionError(lb.proc.output()) from None
            seen = {_get(port, "/whoami").json()["id"] for _ in range(20)}
            assert seen <= {"q1", "q2"} and seen
            redis.kill()  # Redis away: the last pool is kept in every worker, said once
            wait_until(lambda: "unreachable" in lb.proc.output(), timeout=10)  # type: ignore[union-attr]
            for _ in range(20):
                assert _get(port, "/whoami").status_code == 200
            assert lb.proc.output().count("unreachable") == 1, lb.proc.output()
        finally:
            lb.stop()
    finally:
        for proc in regs:
            proc.signal(signal.SIGKILL)  # nothing to deregister from: Redis is gone
            proc.stop()
        for b in backends:
            b.stop()


def test_workers_auto_is_the_cpu_count() -> None:
    import click

    from lbproxy.cli import WorkerCount

    count = WorkerCount()
    assert count.convert("auto", None, None) == min(64, len(os.sched_getaffinity(0)))
    assert count.convert("3", None, None) == 3
    for bad in ("0", "65", "many"):
        with pytest.raises(click.BadParameter):
            count.convert(bad, None, None)
    out = _cli("serve", "--config", "/nonexistent.toml", "--workers", "0")
    assert out.returncode == 2 and "--workers" in out.stderr


def test_a_passive_failure_in_a_worker_marks_the_backend_down_everywhere(
    tmp_path: Path,
) -> None:
    backend = Backend("p1").start()
    try:
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there
        health = {"check": "none", "interval": 60.0, "passive_failures": 1}
        text, port, admin = proxy_config(
            [(backend.id, backend.address), ("dead", dead)],
            pool={"balance": "round-robin"},
            health=health,
        )
        lb = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port,))
        try:
            wait_until(lambda: len(_get(admin, "/api/info").json()["workers"]) == 2, timeout=20)
            for _ in range(6):  # a connect to "dead" fails, the retry goes to p1
                assert _get(port, "/whoami").json()["id"] == "p1"

            def state() -> str:
                pools = _get(admin, "/api/pools").json()["pools"]
                return str({b["id"]: b["state"] for b in pools["main"]["backends"]}["dead"])

            wait_until(lambda: state() == "down", timeout=5)  # the supervisor's view
            assert lb.proc is not None and "(worker " in lb.proc.output()  # a worker saw it
        finally:
            lb.stop()
    finally:
        backend.stop()


async def test_sighup_adds_a_pool_and_listener_in_every_worker(tmp_path: Path) -> None:
    one, two = Backend("h1").start(), Backend("h2").start()
    try:
        text, port, admin = proxy_config([(one.id, one.address)])
        lb = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port,))
        try:
            wait_until(lambda: len(_get(admin, "/api/info").json()["workers"]) == 2, timeout=20)
            extra_port = free_port()
            extra = (
                f'\n[listeners.more]\nbind = "127.0.0.1:{extra_port}"\nmode = "http"\n'
                f'pool = "more"\n\n[pools.more]\nbackends = [{{ id = "h2", '
                f'address = "{two.address}" }}]\n[pools.more.health]\ncheck = "none"\n'
            )
            lb.path.write_text(text + extra)
            assert lb.proc is not None
            lb.proc.signal(signal.SIGHUP)
            wait_until(lambda: port_open(extra_port), timeout=10)
            await await_until(lambda: _get(extra_port, "/whoami").json()["id"] == "h2", timeout=10)
            conns = await _open(extra_port, 8)  # spread over both workers by the kernel

            def counted() -> int:
                pools = _get(admin, "/api/pools").json()["pools"]
                return int(pools["more"]["backends"][0]["active"])

            # the new pool's backend got its shared column in every worker
            await await_until(lambda: counted() == 8 == _own_counts(two)["h2"], timeout=10)
            held = [w["connections"] for w in _get(admin, "/api/info").json()["workers"]]
            assert sum(held) == 8
            for conn in conns:
                await conn.close()
        finally:
            lb.stop()
    finally:
        one.stop()
        two.stop()


async def test_ctrl_c_to_the_process_group_drains_every_worker_once(tmp_path: Path) -> None:
    backend = Backend("g1").start()
    try:
        text, port, admin = proxy_config(
            [(backend.id, backend.address)], pool={"drain_timeout": 0.2, "close_spread": 0.1}
        )
        lb = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port,))
        try:
            wait_until(lambda: len(_get(admin, "/api/info").json()["workers"]) == 2, timeout=20)
            conns = await _open_on_every_worker(port, admin)
            os.killpg(lb.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
            await await_until(lambda: all(c.state is State.CLOSED for c in conns), timeout=10)
            assert {c.close_code for c in conns} == {1001}  # drained, not cut by a 2nd signal
            assert lb.proc is not None and lb.proc.wait(timeout=10) == 0
        finally:
            lb.stop()
    finally:
        backend.stop()


async def _open_on_every_worker(port: int, admin: int) -> list[ClientConnection]:
    """Websockets until every worker holds one (the kernel's SO_REUSEPORT hash may put a
    batch on one worker), at most 64."""
    conns: list[ClientConnection] = []
    while len(conns) < 64:
        conns += await _open(port, 8)
        try:
            await await_until(lambda: min(w["connections"] for w in _workers(admin)) > 0, 3)
            return conns
        except AssertionError:
            continue
    raise AssertionError(f"{len(conns)} websockets and a worker holds none: {_workers(admin)}")


def _workers(admin: int) -> list[dict[str, int]]:
    return list(_get(admin, "/api/info").json()["workers"])
