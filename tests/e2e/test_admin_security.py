"""Admin API security (README "Admin API security"): Host check against DNS rebinding (421), no
proxies (403), max_connections, and the file descriptors kept in reserve so /metrics answers while
the proxy is full. Against real lbproxy subprocesses, plus the pure parts in-process."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbproxy.ops import admin_client
from lbproxy.ops.admin_guard import HostPolicy, allowed_host_entry, refusal, split_host
from lbproxy.ops.fdreserve import FdReserve, reserve_size
from tests.e2e.test_native_upgrade import SWITCH, UPGRADE, read_head
from tests.e2e.test_tunnel import TcpServer
from tests.support import Lbproxy, free_port, lbproxy_cmd, proxy_config, wait_until
from tests.unit.test_config import problems_of

pytestmark = pytest.mark.timeout(60)

MAX_CONNECTIONS = 4


def get(
    port: int, path: str, host: str | None, method: str = "GET", **headers: str
) -> tuple[int, bytes]:
    """One request on its own connection with exactly this Host (None: HTTP/1.1's own)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        sent = {"Connection": "close", **{k.replace("_", "-"): v for k, v in headers.items()}}
        if host is not None:
            sent["Host"] = host
        conn.request(method, path, headers=sent)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def backend_state(port: int) -> str:
    status, body = get(port, "/api/pools", "localhost")
    assert status == 200
    return str(json.loads(body)["pools"]["main"]["backends"][0]["state"])


@pytest.fixture(scope="module")
def admin_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    text, port, admin = proxy_config([("b1", f"127.0.0.1:{free_port()}")])
    text = text.replace(
        "[admin]\n",
        f'[admin]\nallowed_hosts = ["LB.example", "[2001:db8::1]"]\n'
        f"max_connections = {MAX_CONNECTIONS}\n",
        1,
    )
    lb = Lbproxy(text, tmp_path_factory.mktemp("admin")).start(wait_ports=(port, admin))
    yield admin
    lb.stop()


# -- DNS rebinding: Host ------------------------------------------------------------
def test_rebinding_host_is_refused_and_drains_nothing(admin_port: int) -> None:
    for host in ("evil.example", f"evil.example:{admin_port}"):
        status, body = get(admin_port, "/api/pools", host)
        assert status == 421, body
        assert b"b1" not in body and b"127.0.0.1" not in body  # no backend address leaks
        path = "/api/pools/main/backends/b1/drain"
        status, body = get(admin_port, path, host, method="POST")
        assert status == 421, body
    assert get(admin_port, "/metrics", "evil.example")[0] == 421
    assert backend_state(admin_port) == "up"  # nothing drained
    # (the same drain with a good Host does drain: the refusal above is the Host check)
    assert get(admin_port, "/api/pools/main/backends/b1/drain", "localhost", "POST")[0] == 202
    assert backend_state(admin_port) == "draining"
    assert get(admin_port, "/api/pools/main/backends/b1/enable", "localhost", "POST")[0] == 200
    assert backend_state(admin_port) == "up"


def test_cross_origin_drain_is_refused(admin_port: int) -> None:
    """A page of another origin POSTing a drain (CSRF, with the real Host) is refused."""
    path = "/api/pools/main/backends/b1/drain"
    host = f"127.0.0.1:{admin_port}"
    status, body = get(admin_port, path, host, "POST", Origin="https://evil.example")
    assert status == 403, body
    assert backend_state(admin_port) == "up"
    status, _ = get(admin_port, path, host, "POST", Origin=f"http://{host}")  # the dashboard
    assert status == 202
    assert get(admin_port, "/api/pools/main/backends/b1/enable", host, "POST")[0] == 200


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.1:{port}",  # the admin address as configured
        "localhost",
        "localhost:{port}",
        "LocalHost:{port}",
        "[::1]:{port}",  # loopback literals always
        "lb.example",  # allowed_hosts entries (any case, any port)
        "lb.EXAMPLE:8443",
        "[2001:db8::1]:{port}",
    ],
)
def test_admin_address_localhost_and_allowed_hosts_are_served(admin_port: int, host: str) -> None:
    status, body = get(admin_port, "/api/pools", host.format(port=admin_port))
    assert status == 200, body
    assert json.loads(body)["pools"]["main"]["backends"][0]["id"] == "b1"


@pytest.mark.parametrize(
    "host",
    ["localhost.evil.example", "127.0.0.1.nip.io", "lb.example.evil", "", "[::1", "a b"],
)
def test_other_hosts_get_421(admin_port: int, host: str) -> None:
    assert get(admin_port, "/api/pools", host)[0] == 421


def test_dashboard_and_metrics_from_a_browser_url(admin_port: int) -> None:
    for host in (f"127.0.0.1:{admin_port}", f"localhost:{admin_port}"):
        status, body = get(admin_port, "/", host)
        assert status == 200 and b"<html" in body.lower()
        status, body = get(admin_port, "/metrics", host)
        assert status == 200 and b"lbproxy_backend_up" in body


# -- never through a proxy ----------------------------------------------------------
def test_forwarded_requests_get_403(admin_port: int) -> None:
    status, body = get(admin_port, "/metrics", "localhost", X_Forwarded_For="10.0.0.1")
    assert status == 403 and b"X-Forwarded-For".lower() in body.lower()
    status, _ = get(admin_port, "/api/pools", "localhost", Forwarded="for=10.0.0.1")
    assert status == 403
    path = "/api/pools/main/backends/b1/drain"
    assert get(admin_port, path, "localhost", "POST", Forwarded="for=10.0.0.1")[0] == 403
    assert backend_state(admin_port) == "up"


# -- the CLI clients ----------------------------------------------------------------
def test_cli_clients_pass_the_checks(
    admin_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # (an http_proxy in the environment is not used: the admin API refuses proxies)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    url = f"http://127.0.0.1:{admin_port}"
    assert admin_client.admin_host(url) == f"localhost:{admin_port}"
    assert admin_client.drain(url, "main", "b1") == 0
    assert backend_state(admin_port) == "draining"
    assert admin_client.enable(url, "main", "b1") == 0
    assert admin_client.status(url, as_json=True) == 0
    assert '"id": "b1"' in capsys.readouterr().out


# -- max_connections ----------------------------------------------------------------
def _served(port: int) -> http.client.HTTPConnection | None:
    """A new keep-alive connection that got its answer (None if refused)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/healthz", headers={"Host": "localhost"})
    response = conn.getresponse()
    response.read()
    if response.status == 200:
        return conn
    conn.close()
    return None


def test_connections_over_max_get_503_while_the_others_still_answer(admin_port: int) -> None:
    held: list[http.client.HTTPConnection] = []
    try:
        for _ in range(MAX_CONNECTIONS):  # (until earlier tests' connections are gone)
            held.append(wait_until(lambda: _served(admin_port)))  # type: ignore[arg-type]
        with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as extra:
            extra.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := extra.recv(65536):  # until the server closes it
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"max_connections = 4" in answer
        for conn in held:  # the held ones still answer, on their same sockets
            sock = conn.sock
            conn.request("GET", "/metrics", headers={"Host": "localhost"})
            response = conn.getresponse()
            assert response.status == 200 and b"lbproxy_" in response.read()
            assert conn.sock is sock
        held.pop().close()  # one leaves: a new one is served again
        held.append(wait_until(lambda: _served(admin_port)))  # type: ignore[arg-type]
    finally:
        for conn in held:
            conn.close()


# -- fd reserve: /metrics while the proxy is full -----------------------------------
def _open_one(port: int, mode: str) -> tuple[socket.socket, bytes]:
    """A new proxied connection and what it got: a 101 head / the tcp backend's greeting when
    admitted, the 503 (http) or b"" (tcp: closed) when refused."""
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if mode == "http":
            c.sendall(UPGRADE)
            return c, read_head(c)
        return c, c.recv(4096)
    except OSError as exc:  # (a reset: the accept itself found no fd)
        return c, repr(exc).encode()


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_metrics_answer_while_the_proxy_is_out_of_fds(tmp_path: Path, mode: str) -> None:
    """lbproxy under a 64-fd limit, filled with held connections until it refuses (http:
    503, tcp: closed): 30 of 30 /metrics scrapes are answered."""
    admitted = b"HTTP/1.1 101 " if mode == "http" else b"hi\n"

    def hold(conn: socket.socket) -> None:
        if mode == "http":
            read_head(conn)
            conn.sendall(SWITCH)
        else:
            conn.sendall(b"hi\n")
        while conn.recv(4096):
            pass

    server = TcpServer(hold)
    text, port, admin = proxy_config([("b1", f"127.0.0.1:{server.port}")], mode=mode)
    text = text.replace("[admin]\n", f"[admin]\nmax_connections = {MAX_CONNECTIONS}\n", 1)
    prlimit = ("prlimit", "--nofile=64:64")
    proc = Lbproxy(text, tmp_path, prefix=prlimit).start(wait_ports=(port, admin))
    held: list[socket.socket] = []
    try:
        refused = b"(never)"
        for _ in range(64):
            c, answer = _open_one(port, mode)
            if not answer.startswith(admitted):
                refused = answer
                c.close()
                break
            held.append(c)
        clean = b"HTTP/1.1 503 Service Unavailable" if mode == "http" else b""
        assert refused.startswith(clean) and (mode == "http" or refused == b""), refused
        assert mode == "tcp" or b"out of file descriptors" in refused
        assert len(held) >= 5  # (the proxy did serve until near the limit)
        answered = 0
        for _ in range(30):
            status, body = get(admin, "/metrics", None)
            answered += status == 200 and b"lbproxy_connections_total" in body
        assert answered == 30
        assert b'reason="fd_reserve"' in body
        c, answer = _open_one(port, mode)  # still full: still refused
        c.close()
        assert answer == b"" if mode == "tcp" else answer.startswith(clean), answer
    finally:
        for c in held:
            c.close()
        proc.stop()
        server.close()


# -- pure parts ---------------------------------------------------------------------
def test_split_host() -> None:
    assert split_host("Example.COM:80") == ("example.com", 80)
    assert split_host("[0:0::1]:9901") == ("::1", 9901)
    assert split_host("localhost.") == ("localhost", None)
    for bad in ("::1", "[::1", "[nothost]:1", "a:b", "a:99999", "", "a/b"):
        with pytest.raises(ValueError):
            split_host(bad)


def test_host_policy() -> None:
    policy = HostPolicy.build("0.0.0.0", ["lb.example"])
    assert policy.names == frozenset({"lb.example"})  # (0.0.0.0 names no host)
    assert policy.allows("127.9.9.9:1") and policy.allows("[::1]") and policy.allows("lb.example")
    # IP literals cannot be rebound; Prometheus and Kubernetes probes send Host: POD_IP:PORT
    assert policy.allows("10.0.0.5:9901") and policy.allows("[fd00::5]:9901")
    assert not policy.allows("lb2.example") and not policy.allows("10.0.0.5.nip.io")
    assert HostPolicy.build("10.0.0.5", []).allows("10.0.0.5:9901")
    assert HostPolicy.build("::1", []).names == frozenset({"::1"})
    good = {"host": b"localhost"}
    assert refusal(policy, good) is None
    assert refusal(policy, {}) == (400, "a Host header is required")
    assert refusal(policy, {"host": b"evil"})[0] == 421  # type: ignore[index]
    assert refusal(policy, {**good, "forwarded": b"for=x"})[0] == 403  # type: ignore[index]


def test_cross_origin_changes_are_refused() -> None:
    """CSRF: a page anywhere can POST to the admin API (its Host is the real one)."""
    policy = HostPolicy.build("127.0.0.1", [])
    host = {"host": b"127.0.0.1:9901"}
    evil = {**host, "origin": b"https://evil.example"}
    assert refusal(policy, evil, "POST") == (
        403,
        "refused: a change requested by a page of another origin",
    )
    assert refusal(policy, {**host, "origin": b"null"}, "POST") is not None
    assert refusal(policy, {**host, "sec-fetch-site": b"cross-site"}, "POST") is not None
    assert refusal(policy, evil, "GET") is None  # (reads are the Host check's and CORS's)
    assert refusal(policy, {**host, "origin": b"http://127.0.0.1:9901"}, "POST") is None
    assert refusal(policy, host, "POST") is None  # the CLI, curl: no Origin


def test_allowed_host_entries() -> None:
    assert allowed_host_entry("LB.Example") == "lb.example"
    assert allowed_host_entry("[2001:DB8::1]") == "2001:db8::1"
    assert allowed_host_entry("2001:db8::1") == "2001:db8::1"
    for bad in ("lb.example:80", "[::1]:80", "", "a b", "http://x", "lb:"):
        with pytest.raises(ValueError):
            allowed_host_entry(bad)


def _admin(**admin: Any) -> dict[str, Any]:
    return {
        "admin": admin,
        "listeners": {"public": {"bind": "127.0.0.1:8080", "pool": "chat"}},
        "pools": {"chat": {"backends": [{"id": "b1", "address": "127.0.0.1:9001"}]}},
    }


def test_config_validation_of_the_new_keys() -> None:
    assert problems_of(_admin(allowed_hosts=["ok.example", "bad:80", 7])) == [
        "conf.toml: admin.allowed_hosts[1]: 'bad:80' is not a host name or IP address "
        "(without a port)",
        "conf.toml: admin.allowed_hosts[2]: must be a string, got 7",
    ]
    assert problems_of(_admin(allowed_hosts="lb.example")) == [
        "conf.toml: admin.allowed_hosts: must be a list of host names, got 'lb.example'"
    ]
    for bad in (0, -1, "64", True):
        assert problems_of(_admin(max_connections=bad)) == [
            f"conf.toml: admin.max_connections: must be an integer from 1 to 65536, "
            f"got {'true' if bad is True else repr(bad)}"
        ]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fd_reserve_estimate_rescans_only_near_the_limit() -> None:
    held = [0]  # connections open (2 fds each) besides 20 fds of the process itself
    scans: list[int] = []

    def count() -> int:  # what /proc/self/fd would show: with the socket just accepted
        scans.append(20 + 2 * held[0] + 1)
        return scans[-1]

    clock = Clock()
    reserve = FdReserve(100, lambda: 30, count=count, clock=clock)
    assert reserve.budget.fits(30) and len(scans) == 1
    clock.now += 1.0
    while reserve.admit():  # no scan while the estimate (base + 2 per admit) is far off
        held[0] += 1
    # 20 + 2 * 24 + 2 + 30 = 100 reached: one rescan, which confirms the estimate
    assert held[0] == 24 and len(scans) == 2
    held[0] -= 10  # connections closed, but the last scan is fresh: still refused
    assert not reserve.admit() and len(scans) == 2
    clock.now += 1.0
    assert reserve.admit() and len(scans) == 3  # a new scan sees the room
    assert reserve.estimate() == 20 + 2 * 14 + 1 + 2


def test_fd_reserve_estimate_corrects_itself_when_connections_closed() -> None:
    clock = Clock()
    reserve = FdReserve(100, lambda: 30, count=lambda: 21, clock=clock)
    clock.now += 1.0
    admitted = sum(reserve.admit() for _ in range(200))  # (each one closed at once)
    assert admitted == 200
    assert reserve_size(64, 3) == 64 + 4 + 3 + 16


def test_fd_reserve_that_does_not_fit_or_grows() -> None:
    wanted = [reserve_size(64, 1)]
    reserve = FdReserve(64, lambda: wanted[0], count=lambda: 10)
    assert not reserve.budget.fits(wanted[0]) and reserve.budget.fits(32)
    wanted[0] = 1000  # (say, many discovered backends): capped at half the limit
    reserve.refresh()
    assert reserve.budget.reserve == 32


HEALTH_OUT_OF_FDS = """
import asyncio, os, resource, sys
from lbproxy.config.types import Address, BackendConfig, HealthConfig, PoolConfig
from lbproxy.ops.health import HealthChecker
from lbproxy.core.pool import Pool
from lbproxy.ops.stats import Stats

async def main() -> None:
    config = HealthConfig(check="tcp", fall=1)
    address = Address("127.0.0.1", int(sys.argv[1]))  # nothing listens there
    pool = Pool(PoolConfig(name="p", backends=(BackendConfig("b1", address),), health=config))
    stats = Stats()
    checker = HealthChecker(pool, stats)
    backend = pool.backends["b1"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    await checker._check_once(backend, config)  # no fd: no verdict
    print(dict(stats.health_checks), backend.state.value)
    for fd in filler:
        os.close(fd)
    await checker._check_once(backend, config)  # the same check with fds: it fails
    print(dict(stats.health_checks), backend.state.value)

asyncio.run(main())
"""


def test_health_check_without_fds_is_no_failure() -> None:
    """A check lbproxy cannot make (EMFILE) is skipped, not held against the backend."""
    out = subprocess.run(
        [sys.executable, "-c", HEALTH_OUT_OF_FDS, str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    assert out == [
        "{('p', 'b1', 'skipped'): 1} up",
        "{('p', 'b1', 'skipped'): 1, ('p', 'b1', 'fail'): 1} down",
    ]


def test_check_config_reports_the_new_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[admin]\nallowed_hosts = ["lb.example", "http://lb.example/"]\nmax_connections = 0\n'
        '[listeners.public]\nbind = "127.0.0.1:8080"\npool = "chat"\n'
        '[pools.chat]\nbackends = [{ id = "b1", address = "127.0.0.1:9001" }]\n'
    )
    done = subprocess.run(
        lbproxy_cmd("check-config", str(path)), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stdout.splitlines() + done.stderr.splitlines() == [
        f"{path}: admin.allowed_hosts[1]: 'http://lb.example/' is not a host name or IP "
        "address (without a port)",
        f"{path}: admin.max_connections: must be an integer from 1 to 65536, got 0",
    ]
