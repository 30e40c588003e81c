"""Admission control end to end (SPEC 12): real lbproxy subprocesses, a real redis-server,
clients bound to distinct 127.0.0.x source addresses (one client IP each)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Backend, Lbproxy, RedisServer, proxy_config, wait_until

pytestmark = pytest.mark.timeout(90)


def _limits_table(**limits: object) -> str:
    values = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in limits.items())
    return f"\n[listeners.public.limits]\n{values}\n"


def _request(port: int, source: str, path: str = "/whoami") -> tuple[int, dict[str, str]]:
    """One HTTP request from ``source``: (status, headers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), {k.lower(): v for k, v in headers.items()}


def _open(port: int, source: str) -> socket.socket:
    """A keep-alive connection from ``source`` that got its first answer (admitted), or
    raises ConnectionRefusedError with the 429."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    data = b""
    try:
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: test\r\n\r\n")
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        s.close()
        raise
    if not data.startswith(b"HTTP/1.1 200"):
        s.close()
        raise ConnectionRefusedError(data.split(b"\r\n", 1)[0].decode())
    return s


def _metric(admin: int, name: str) -> str:
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend("b1").start()
    try:
        yield b
    finally:
        b.stop()


def _pair(
    tmp_path: Path, backend: Backend, redis: RedisServer, **limits: object
) -> tuple[list[Lbproxy], list[int], list[int]]:
    procs: list[Lbproxy] = []
    ports: list[int] = []
    admins: list[int] = []
    for name in ("a", "b"):
        extra = _limits_table(scope="redis", **limits) + f'\n[redis]\nurl = "{redis.url}"\n'
        text, port, admin = proxy_config([("b1", backend.address)], extra=extra)
        procs.append(Lbproxy(text, tmp_path, name=name).start(wait_ports=(port, admin)))
        ports.append(port)
        admins.append(admin)
    return procs, ports, admins


def test_rate_per_ip_holds_across_two_instances(
    tmp_path: Path, backend: Backend, redis: RedisServer
) -> None:
    procs, ports, admins = _pair(tmp_path, backend, redis, rate_per_ip=5, burst=5)
    try:
        results = [_request(ports[i % 2], "127.0.0.2") for i in range(12)]
        passed = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] != 200]
        assert 5 <= len(passed) <= 6, results
        assert refused and all(status == 429 for status, _ in refused)
        assert all(int(headers["retry-after"]) >= 1 for _, headers in refused)
        assert _request(ports[0], "127.0.0.3")[0] == 200  # another IP is unaffected
        assert _request(ports[1], "127.0.0.3")[0] == 200
        lines = _metric(admins[0], "lbproxy_rejected_total") + _metric(
            admins[1], "lbproxy_rejected_total"
        )
        assert 'reason="rate_per_ip"' in lines
        assert "lbproxy_limits_redis_up 1.0" in _metric(admins[0], "lbproxy_limits_redis_up")
    finally:
        for proc in procs:
            proc.stop()


def test_connections_per_ip_across_two_instances(
    tmp_path: Path, backend: Backend, redis: RedisServer
) -> None:
    procs, ports, _ = _pair(tmp_path, backend, redis, connections_per_ip=3)
    held: list[socket.socket] = []
    try:
        held.append(_open(ports[0], "127.0.0.4"))
        held.append(_open(ports[1], "127.0.0.4"))
        held.append(_open(ports[0], "127.0.0.4"))
        for port in ports:
            status, headers = _request(port, "127.0.0.4")
            assert status == 429 and "retry-after" in headers
        assert _request(ports[1], "127.0.0.5")[0] == 200
        held.pop().close()  # one closes: its count goes down, everywhere

        def admitted_again() -> bool:
            try:
                held.append(_open(ports[1], "127.0.0.4"))
            except ConnectionRefusedError:
                return False
            return True

        wait_until(admitted_again, timeout=10, interval=0.2)
        assert _request(ports[0], "127.0.0.4")[0] == 429
    finally:
        for s in held:
            s.close()
        for proc in procs:
            proc.stop()


def test_redis_away_fails_open_and_says_so_once(
    tmp_path: Path, backend: Backend, redis: RedisServer
) -> None:
    procs, ports, admins = _pair(tmp_path, backend, redis, rate_per_ip=2, burst=2)
    try:
        assert [_request(ports[0], "127.0.0.6")[0] for _ in range(3)][-1] == 429
        redis.kill()
        statuses = [_request(ports[0], "127.0.0.6")[0] for _ in range(12)]
        # (the first one may still be refused: Redis died while answering it)
        assert statuses[1:] == [200] * (len(statuses) - 1), statuses
        wait_until(lambda: "redis_up 0.0" in _metric(admins[0], "lbproxy_limits_redis_up"))
        statuses = [_request(ports[0], "127.0.0.6")[0] for _ in range(5)]
        assert statuses == [200] * 5
        proc = procs[0].proc
        assert proc is not None
        log = proc.output()
        assert log.count("limits: Redis unreachable") == 1, log
        assert "admitting without shared limits" in log
    finally:
        for each in procs:
            each.stop()


def test_tcp_mode_closes_without_a_byte(tmp_path: Path) -> None:
    backend = Backend("t1").start()
    text, port, admin = proxy_config(
        [("t1", backend.address)], mode="tcp", extra=_limits_table(connections_per_ip=1)
    )
    proc = Lbproxy(text, tmp_path).start(wait_ports=(port, admin))
    try:
        first = _open(port, "127.0.0.7")  # (the backend answers through the tcp tunnel)
        refused = socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=("127.0.0.7", 0)
        )
        assert refused.recv(65536) == b""  # closed (FIN), not a byte sent
        refused.close()
        other = _open(port, "127.0.0.8")
        other.close()
        assert 'reason="connections_per_ip"' in _metric(admin, "lbproxy_rejected_total")
        first.close()
        wait_until(lambda: _try_open(port, "127.0.0.7"), timeout=10, interval=0.2)
    finally:
        proc.stop()
        backend.stop()


def _try_open(port: int, source: str) -> bool:
    try:
        _open(port, source).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return False
    return True


def test_behind_a_trusted_proxy_the_forwarded_client_is_limited(
    tmp_path: Path, backend: Backend
) -> None:
    """The peer is a trusted proxy: each X-Forwarded-For client has its own rate (local
    scope), and the proxy itself is not limited as one client."""
    text, port, admin = proxy_config(
        [("b1", backend.address)],
        listener={"trusted_proxies": ["127.0.0.9/32"]},
        extra=_limits_table(rate_per_ip=0.5, burst=2),
    )
    proc = Lbproxy(text, tmp_path).start(wait_ports=(port, admin))

    def via_proxy(client: str) -> int:
        with socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=("127.0.0.9", 0)
        ) as s:
            s.sendall(
                b"GET /whoami HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
                + f"X-Forwarded-For: 203.0.113.77, {client}\r\n\r\n".encode()
            )
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return int(data.split(b" ", 2)[1])

    try:
        assert [via_proxy("198.51.100.1") for _ in range(4)] == [200, 200, 429, 429]
        assert [via_proxy("198.51.100.2") for _ in range(2)] == [200, 200]
        # a client connecting directly is limited on its own address
        assert [_request(port, "127.0.0.10")[0] for _ in range(3)] == [200, 200, 429]
    finally:
        proc.stop()


def test_workers_share_local_limits(tmp_path: Path, backend: Backend) -> None:
    """`serve --workers 2`: connections_per_ip holds for the balancer (the kernel spreads the
    client's connections over both workers)."""
    text, port, admin = proxy_config(
        [("b1", backend.address)], extra=_limits_table(connections_per_ip=3)
    )
    proc = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port, admin))
    held: list[socket.socket] = []
    try:
        wait_until(
            lambda: len(httpx.get(f"http://127.0.0.1:{admin}/api/info").json()["workers"]) == 2
        )
        for _ in range(3):
            held.append(_open(port, "127.0.0.11"))
        pids = {int(_request(port, "127.0.0.12", "/whoami")[0])}  # (another IP: admitted)
        assert pids == {200}
        assert [_request(port, "127.0.0.11")[0] for _ in range(6)] == [429] * 6
        held.pop().close()
        wait_until(lambda: _try_open(port, "127.0.0.11"), timeout=10, interval=0.2)
    finally:
        for s in held:
            s.close()
        proc.stop()
