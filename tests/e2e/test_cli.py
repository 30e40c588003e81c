"""The command line as users run it: check-config, serve on a bad config, --workers, --version."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from lbproxy import __version__
from tests.support import REPO, Backend, Lbproxy, free_port, lbproxy_cmd, proxy_config, wait_until

pytestmark = pytest.mark.timeout(60)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lbproxy_cmd(*args), capture_output=True, text=True, timeout=30)


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0 and __version__ in out.stdout


def test_check_config_accepts_the_examples() -> None:
    for name in ("lbproxy.toml", "static-demo.toml"):
        out = run("check-config", str(REPO / "config" / name))
        assert out.returncode == 0, out.stderr


def test_bad_config_exits_2_with_file_key_and_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[listeners.public]\nbind = "127.0.0.1:8080"\nmode = "udp"\npool = "nope"\n'
        '[pools.chat]\nbalance = "random"\nbackends = [{ id = "a", address = "127.0.0.1" }]\n'
    )
    for args in (("check-config", str(bad)), ("serve", "--config", str(bad))):
        out = run(*args)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert f"{bad}: listeners.public.mode: must be one of 'http', 'tcp', got 'udp'" in lines
        assert any(line.startswith(f"{bad}: listeners.public.pool: ") for line in lines)
        assert any(line.startswith(f"{bad}: pools.chat.balance: ") for line in lines)
        assert any(line.startswith(f"{bad}: pools.chat.backends[0].address: ") for line in lines)
    out = run("check-config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "missing.toml: cannot read" in out.stderr


def test_admin_clients_report_unreachable_admin() -> None:
    out = run("status", "--admin", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "cannot reach admin API" in out.stderr


def test_workers_share_the_port_and_stop_cleanly(tmp_path: Path) -> None:
    backend = Backend("w1").start()
    try:
        text, port, admin = proxy_config([(backend.id, backend.address)])
        lb = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port,))
        assert lb.proc is not None
        try:
            # one admin API (the supervisor's) for the whole balancer
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{admin}/healthz").status_code == 200)
            for _ in range(20):
                with httpx.Client() as client:  # new connections: the kernel spreads them
                    assert client.get(f"http://127.0.0.1:{port}/whoami").json()["id"] == "w1"

            def served() -> int:  # the balancer's total (the workers report once a second)
                return sum(
                    int(float(line.split()[-1]))
                    for line in httpx.get(f"http://127.0.0.1:{admin}/metrics").text.splitlines()
                    if line.startswith("lbproxy_connections_total{")
                )

            wait_until(lambda: served() >= 20)
            lb.proc.signal(signal.SIGTERM)
            assert lb.proc.wait(timeout=20) == 0
            out = subprocess.run(["pgrep", "-f", str(lb.path)], capture_output=True, text=True)
            assert out.stdout.strip() == ""  # no worker left behind
        finally:
            lb.stop()
    finally:
        backend.stop()


def test_json_access_log_has_one_line_per_connection(tmp_path: Path) -> None:
    import json

    from websockets.sync.client import connect as ws_connect

    backend = Backend("j1").start()
    try:
        text, port, _ = proxy_config([(backend.id, backend.address)])
        lb = Lbproxy(text, tmp_path, "--log-format", "json").start(wait_ports=(port,))
        assert lb.proc is not None
        try:
            with ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
                ws.send("x" * 1000)
                assert ws.recv(timeout=5) == "x" * 1000

            def access_lines() -> list[dict[str, object]]:
                out = []
                for line in lb.proc.output().splitlines():  # type: ignore[union-attr]
                    if line.startswith("{"):
                        record = json.loads(line)
                        if record["logger"] == "lbproxy.access":
                            out.append(record)
                return out

            wait_until(lambda: any(r.get("backend") == "j1" for r in access_lines()))
            (record,) = [r for r in access_lines() if r.get("backend") == "j1"]
            assert record["listener"] == "public" and record["pool"] == "main"
            assert record["client"] == "127.0.0.1"
            assert int(record["bytes_in"]) > 1000 and int(record["bytes_out"]) > 1000  # type: ignore[call-overload]
            assert float(record["duration"]) >= 0  # type: ignore[arg-type]
            assert record["reason"]
        finally:
            lb.stop()
    finally:
        backend.stop()


def test_register_exits_1_when_redis_is_unreachable() -> None:
    port = free_port()  # nothing listens there
    out = run(
        "register", "--redis", f"redis://user:s3cret@127.0.0.1:{port}/0", "--pool", "chat",
        "--address", "127.0.0.1:9001",
    )  # fmt: skip
    assert out.returncode == 1
    assert "cannot reach Redis" in out.stderr
    assert "s3cret" not in out.stderr + out.stdout  # no secret in the message


def test_workers_reload_on_sighup(tmp_path: Path) -> None:
    first, second = Backend("h1").start(), Backend("h2").start()
    try:
        text, port, admin = proxy_config([(first.id, first.address)])
        lb = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port,))
        assert lb.proc is not None
        try:
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{admin}/healthz").status_code == 200)
            new_text, _, _ = proxy_config(
                [(second.id, second.address)], port=port, admin_port=admin
            )
            lb.path.write_text(new_text)
            lb.proc.signal(signal.SIGHUP)

            def moved() -> bool:
                pools = httpx.get(f"http://127.0.0.1:{admin}/api/pools").json()["pools"]
                return [b["id"] for b in pools["main"]["backends"]] == ["h2"]

            wait_until(moved)
            for _ in range(20):  # new connections, spread over both workers: all to h2
                with httpx.Client() as client:
                    assert client.get(f"http://127.0.0.1:{port}/whoami").json()["id"] == "h2"
            # a bad file on SIGHUP is refused once, in the parent, and the workers keep going
            lb.path.write_text(new_text.replace('mode = "http"', 'mode = "sctp"'))
            lb.proc.signal(signal.SIGHUP)
            wait_until(lambda: "reload rejected" in lb.proc.output())  # type: ignore[union-attr]
            assert httpx.get(f"http://127.0.0.1:{port}/whoami").json()["id"] == "h2"
        finally:
            lb.stop()
    finally:
        first.stop()
        second.stop()
