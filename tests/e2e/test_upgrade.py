"""`lbproxy upgrade`: the next generation takes every tunnel over without closing one
(real lbproxy subprocesses with --workers 2, real backends, real websockets)."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.protocol import State

from tests.e2e.test_tls import self_signed
from tests.support import REPO, Backend, Lbproxy, await_until, lbproxy_cmd, wait_until
from tests.support.config import proxy_config

pytestmark = pytest.mark.timeout(180)


def _info(admin: int) -> dict[str, object]:
    return httpx.get(f"http://127.0.0.1:{admin}/api/info", timeout=5).json()  # type: ignore[no-any-return]


def _generation(admin: int) -> int:
    """The generation serving (0 while the supervisor re-executes itself)."""
    try:
        return int(_info(admin)["generation"])  # type: ignore[call-overload]
    except httpx.HTTPError:
        return 0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _upgrade(admin: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        lbproxy_cmd("upgrade", "--admin", f"http://127.0.0.1:{admin}"),
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, **(env or {})},
    )


def _workers(admin: int) -> list[int]:
    return sorted(int(w["pid"]) for w in _info(admin)["workers"])  # type: ignore[attr-defined]


class Balancer:
    def __init__(self, lb: Lbproxy, port: int, admin: int, backends: list[Backend]) -> None:
        self.lb, self.port, self.admin, self.backends = lb, port, admin, backends

    def upgraded(self, generation: int, before: list[int]) -> None:
        """The upgrade to ``generation`` is complete: same supervisor, new workers only."""
        info = _info(self.admin)
        assert info["pid"] == self.lb.pid and info["generation"] == generation
        now = _workers(self.admin)
        assert not set(now) & set(before)
        wait_until(lambda: not any(_alive(p) for p in before), timeout=20)
        wait_until(lambda: _children(self.lb.pid) == now, timeout=10)


@pytest.fixture
def balancer(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Balancer]:
    mode = getattr(request, "param", "http")
    env = {}
    if mode == "broken":  # a copy of the package on PYTHONPATH, to break before an upgrade
        shutil.copytree(REPO / "lbproxy", tmp_path / "code" / "lbproxy")
        env["PYTHONPATH"] = str(tmp_path / "code")
        env["PYTHONSAFEPATH"] = "1"  # (python -m: not the current directory's lbproxy first)
    one, two = Backend("u1").start(), Backend("u2").start()
    try:
        text, port, admin = proxy_config(
            [(one.id, one.address), (two.id, two.address)],
            mode="tcp" if mode == "tcp" else "http",
            pool={"drain_timeout": 4.0, "close_spread": 0.0},
        )
        if mode == "tls":
            self_signed(tmp_path)
            tls = 'pool = "main"\ntls = { cert = "cert.pem", key = "key.pem" }\n'
            text = text.replace('pool = "main"\n', tls, 1)
        lb = Lbproxy(text, tmp_path, "--workers", "2", env=env).start(wait_ports=(port, admin))
        try:
            wait_until(lambda: len(_workers(admin)) == 2, timeout=20)
            yield Balancer(lb, port, admin, [one, two])
        finally:
            lb.stop()
    finally:
        one.stop()
        two.stop()


class Echoer:
    """Websockets that send sequence numbers and check every echo, in order, continuously."""

    def __init__(self, conns: list[ClientConnection]) -> None:
        self.conns = conns
        self.count = [0] * len(conns)
        self.errors: list[str] = []
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._run(i)) for i in range(len(conns))]

    async def _run(self, i: int) -> None:
        conn = self.conns[i]
        try:
            while not self.stop.is_set():
                n = self.count[i]
                await conn.send(f"{i}:{n}")
                got = await asyncio.wait_for(conn.recv(), 20)
                if got != f"{i}:{n}":
                    self.errors.append(f"conn {i}: sent {i}:{n}, got {got!r}")
                    return
                self.count[i] = n + 1
                await asyncio.sleep(0.1)
        except Exception as exc:  # (a close or a timeout: the test fails with it)
            self.errors.append(f"conn {i}: {exc!r}")

    async def progressed(self, timeout: float = 30.0) -> None:
        """Every connection echoes again (after an upgrade)."""
        marks = list(self.count)
        await await_until(
            lambda: self.errors or all(c > m for c, m in zip(self.count, marks, strict=True)),
            timeout=timeout,
        )
        assert not self.errors, self.errors[:5]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        assert not self.errors, self.errors[:5]
        assert all(c.state is State.OPEN for c in self.conns)


async def _open(port: int, count: int) -> list[ClientConnection]:
    return [await ws_connect(f"ws://127.0.0.1:{port}/echo", max_size=None) for _ in range(count)]


async def _in_thread(fn: object, *args: object) -> subprocess.CompletedProcess[str]:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)  # type: ignore[arg-type]


@pytest.mark.parametrize("balancer", ["http", "tcp"], indirect=True)
async def test_three_upgrades_close_nothing(balancer: Balancer) -> None:
    """200 websockets echo sequence numbers across three upgrades: none closed, every echo
    in order, the supervisor's PID the same, no old worker left."""
    conns = await _open(balancer.port, 200)
    echo = Echoer(conns)
    try:
        await echo.progressed()
        for generation in (2, 3, 4):
            before = _workers(balancer.admin)
            done = await _in_thread(_upgrade, balancer.admin)
            assert done.returncode == 0, done.stdout + done.stderr
            balancer.upgraded(generation, before)
            await echo.progressed()
        await echo.finish()
    finally:
        for conn in conns:
            await conn.close()
    log = balancer.lb.proc.output()  # type: ignore[union-attr]
    assert log.count("took over 200 tunnel(s)") + log.count("took over") >= 2, log[-3000:]


def _raw_ws(port: int) -> socket.socket:
    """A websocket client on a plain socket (to send one frame slowly)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def _send_slowly(sock: socket.socket, payload: bytes, seconds: float) -> None:
    """One masked binary frame, its bytes spread over ``seconds``."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    frame = bytes([0x82, 0x80 | 127]) + len(payload).to_bytes(8, "big") + mask + masked
    pieces = 64
    step = len(frame) // pieces + 1
    for k in range(0, len(frame), step):
        sock.sendall(frame[k : k + step])
        time.sleep(seconds / pieces)


async def test_a_frame_in_flight_arrives_intact(balancer: Balancer) -> None:
    """A 1 MiB message being sent (and echoed) while the upgrade happens arrives whole."""
    sock = _raw_ws(balancer.port)
    payload = os.urandom(1 << 20)
    sender = threading.Thread(target=_send_slowly, args=(sock, payload, 4.0))
    sender.start()
    await asyncio.sleep(0.5)  # (mid-frame now)
    done = await _in_thread(_upgrade, balancer.admin)
    sender.join()
    assert done.returncode == 0, done.stdout + done.stderr
    head = _recv_exactly(sock, 10)
    assert head[0] == 0x82 and head[1] == 127
    assert int.from_bytes(head[2:], "big") == len(payload)
    assert _recv_exactly(sock, len(payload)) == payload
    sock.close()


async def test_a_drain_started_before_still_ends_with_1001(balancer: Balancer) -> None:
    """Drain u1, then upgrade at once: u1's websockets get their 1001 from the new
    generation once drain_timeout is over; u2's stay."""
    conns = await _open(balancer.port, 20)
    for conn in conns:
        await conn.send("who")
        await conn.recv()
    drained = subprocess.run(
        lbproxy_cmd("drain", "main", "u1", "--admin", f"http://127.0.0.1:{balancer.admin}"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert drained.returncode == 0, drained.stderr
    started = time.monotonic()
    done = await _in_thread(_upgrade, balancer.admin)
    assert done.returncode == 0, done.stdout + done.stderr
    await await_until(lambda: any(c.state is State.CLOSED for c in conns), timeout=30)
    await asyncio.sleep(1.0)
    closed = [c for c in conns if c.state is State.CLOSED]
    assert closed and len(closed) < len(conns)
    assert all(c.close_code == 1001 for c in closed)
    assert time.monotonic() - started >= 3.0  # (drain_timeout 4 s, counted from the drain)
    for conn in conns:
        await conn.close()


async def test_an_invalid_config_is_refused_and_nothing_changes(balancer: Balancer) -> None:
    conns = await _open(balancer.port, 10)
    echo = Echoer(conns)
    before = _workers(balancer.admin)
    good = balancer.lb.path.read_text()
    balancer.lb.path.write_text(good.replace('balance = "least-connections"', "balance = 7"))
    done = await _in_thread(_upgrade, balancer.admin)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pools.main.balance" in done.stderr
    assert _info(balancer.admin)["generation"] == 1 and _workers(balancer.admin) == before
    await echo.progressed()
    await echo.finish()
    for conn in conns:
        await conn.close()


@pytest.mark.parametrize("balancer", ["broken"], indirect=True)
async def test_a_new_generation_that_cannot_start_rolls_back(
    balancer: Balancer, tmp_path: Path
) -> None:
    """The code on disk is broken (its listener module raises at import): upgrade exits 1
    with the reason; the old generation serves on, nothing closed."""
    conns = await _open(balancer.port, 10)
    echo = Echoer(conns)
    before = _workers(balancer.admin)
    listener = tmp_path / "code" / "lbproxy" / "proxy" / "listener.py"
    listener.write_text('raise RuntimeError("broken on purpose")\n' + listener.read_text())
    done = await _in_thread(_upgrade, balancer.admin)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "did not start" in done.stderr
    assert _info(balancer.admin)["generation"] == 1 and _workers(balancer.admin) == before
    wait_until(lambda: _children(balancer.lb.pid) == before, timeout=20)
    await echo.progressed()
    await echo.finish()
    for conn in conns:
        await conn.close()


def test_sigusr2_upgrades_too(balancer: Balancer) -> None:
    before = _workers(balancer.admin)
    os.kill(balancer.lb.pid, signal.SIGUSR2)
    wait_until(lambda: _generation(balancer.admin) == 2, timeout=60, interval=0.2)
    balancer.upgraded(2, before)


def _metric_total(admin: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_counters_survive_and_each_access_log_line_is_written_once(
    balancer: Balancer,
) -> None:
    """The balancer's counters do not go back to zero; a moved websocket's access-log line
    comes once, when it really closes, and covers its whole life."""
    conns = await _open(balancer.port, 20)
    payload = "x" * 1000
    for conn in conns:
        await conn.send(payload)
        assert await conn.recv() == payload
    admin = balancer.admin
    await await_until(lambda: _metric_total(admin, "lbproxy_connections_total{") >= 20)
    await await_until(lambda: _metric_total(admin, "lbproxy_bytes_total{") >= 20 * 2000)
    accepted = _metric_total(admin, "lbproxy_connections_total{")
    before = _workers(admin)
    done = await _in_thread(_upgrade, admin)
    assert done.returncode == 0, done.stdout + done.stderr
    balancer.upgraded(2, before)
    assert _metric_total(admin, "lbproxy_connections_total{") >= accepted
    for conn in conns:
        await conn.send(payload)
        assert await conn.recv() == payload
        await conn.close()
    output = balancer.lb.proc.output  # type: ignore[union-attr]

    def lines() -> list[str]:
        return [ln for ln in output().splitlines() if " public -> main/" in ln and " in=" in ln]

    await await_until(lambda: len(lines()) >= 20, timeout=20)
    await asyncio.sleep(1.0)  # (a second line for any of them would show by now)
    logged = lines()
    assert len(logged) == 20, logged
    for line in logged:  # both exchanges counted: the one before the upgrade too
        assert int(line.split(" in=")[1].split()[0]) >= 2 * 1000, line
    await await_until(lambda: _metric_total(admin, "lbproxy_bytes_total{") >= 20 * 4000)


def _get_on(sock: socket.socket) -> bytes:
    """One keep-alive GET on ``sock``; the whole response (Content-Length)."""
    sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: lb\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"closed after {head!r}"
        head += chunk
    head, _, body = head.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + b"\r\n\r\n" + body + _recv_exactly(sock, length - len(body))


async def test_an_idle_keepalive_connection_moves(balancer: Balancer) -> None:
    """A keep-alive connection between two requests goes on in the new generation: its next
    request on the same socket is answered (by a new worker)."""
    socks = [socket.create_connection(("127.0.0.1", balancer.port), timeout=20) for _ in range(4)]
    try:
        for sock in socks:
            assert _get_on(sock).startswith(b"HTTP/1.1 200")
        done = await _in_thread(_upgrade, balancer.admin)
        assert done.returncode == 0, done.stdout + done.stderr
        for sock in socks:
            answer = _get_on(sock)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert b"connection: close" not in answer.lower()
    finally:
        for sock in socks:
            sock.close()


def test_upgrade_timeout_is_validated(tmp_path: Path) -> None:
    """admin.upgrade_timeout: a positive number of seconds (10 by default)."""
    from lbproxy.config.load import load_config
    from lbproxy.errors import ConfigError

    text, _, _ = proxy_config([("b", "127.0.0.1:1")])
    path = tmp_path / "lb.toml"
    path.write_text(text)
    assert load_config(str(path)).admin.upgrade_timeout == 10.0
    path.write_text(text.replace("[admin]\n", "[admin]\nupgrade_timeout = 2.5\n"))
    assert load_config(str(path)).admin.upgrade_timeout == 2.5
    path.write_text(text.replace("[admin]\n", "[admin]\nupgrade_timeout = 0\n"))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert any("admin.upgrade_timeout" in line for line in caught.value.problems)


@pytest.mark.parametrize("balancer", ["tls"], indirect=True)
async def test_tls_tunnels_stay_then_get_their_1001(balancer: Balancer, tmp_path: Path) -> None:
    """A TLS tunnel cannot move (its TLS state is the old process's): it keeps working in
    the old generation up to drain_timeout (4 s here), then gets a 1001; new TLS
    connections are served by the new generation on the same (moved) listening socket."""
    context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    url = f"wss://127.0.0.1:{balancer.port}/echo"
    old = await ws_connect(url, ssl=context)
    await old.send("before")
    assert await old.recv() == "before"
    before = _workers(balancer.admin)
    started = time.monotonic()
    done = await _in_thread(_upgrade, balancer.admin)
    assert done.returncode == 0, done.stdout + done.stderr
    await old.send("still the old generation")
    assert await asyncio.wait_for(old.recv(), 5) == "still the old generation"
    fresh = await ws_connect(url, ssl=context)
    await fresh.send("new")
    assert await fresh.recv() == "new"
    await await_until(lambda: old.state is State.CLOSED, timeout=20)
    assert old.close_code == 1001 and time.monotonic() - started >= 3.0
    balancer.upgraded(2, before)
    await fresh.send("on")
    assert await fresh.recv() == "on"
    await fresh.close()


def _ws_from(port: int, source: str) -> socket.socket:
    """A websocket (raw socket) opened from the client address ``source``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionRefusedError(head.split(b"\r\n", 1)[0].decode())
    return sock


def _admitted(port: int, source: str) -> bool:
    try:
        _ws_from(port, source).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return False
    return True


def test_admission_counts_move_with_their_connections(tmp_path: Path) -> None:
    """connections_per_ip holds across an upgrade: the moved websockets and keep-alive
    connection are still counted (the limit refuses the next one), and released once."""
    one = Backend("a1").start()
    held: list[socket.socket] = []
    try:
        text, port, admin = proxy_config(
            [(one.id, one.address)], extra="\n[listeners.public.limits]\nconnections_per_ip = 3\n"
        )
        lb = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port, admin))
        try:
            wait_until(lambda: len(_workers(admin)) == 2, timeout=20)
            held += [_ws_from(port, "127.0.0.21") for _ in range(2)]
            keep = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.21", 0))
            held.append(keep)
            assert _get_on(keep).startswith(b"HTTP/1.1 200")
            assert not _admitted(port, "127.0.0.21")
            before = _workers(admin)
            done = _upgrade(admin)
            assert done.returncode == 0, done.stdout + done.stderr
            Balancer(lb, port, admin, [one]).upgraded(2, before)
            assert _get_on(keep).startswith(b"HTTP/1.1 200")  # (moved, still counted)
            assert not _admitted(port, "127.0.0.21")
            assert _admitted(port, "127.0.0.22")
            held.pop(0).close()
            wait_until(lambda: _admitted(port, "127.0.0.21"), timeout=10, interval=0.2)
        finally:
            lb.stop()
    finally:
        for s in held:
            s.close()
        one.stop()
