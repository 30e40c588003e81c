"""Smoke tests of the side-by-side benchmark (``python -m bench``, bench/README.md)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench import profile
from bench.cli import default_scenarios, incomplete, parse_args
from bench.failover import failover_metrics, parse_ready
from bench.procs import free_port_run
from bench.report import scenario_table, summary_table
from bench.runner import MAIN_METRIC, RunOutcome, scenario_spec
from bench.scenarios import LIMITS_MISSING, SCENARIOS, targets_for
from bench.stage import QUICK
from bench.targets import TARGETS, Ports, lbproxy_accepts, lbproxy_workers_spec, proxy_spec
from tests.support import REPO

BENCH_TOOLS = ("nginx", "haproxy", "caddy", "gcc", "taskset")
MISSING = [tool for tool in BENCH_TOOLS if shutil.which(tool) is None]
needs_tools = pytest.mark.skipif(
    bool(MISSING),
    reason=f"benchmark tools not installed: {', '.join(MISSING)} (the test command installs them)",
)


def assert_accepted(cmd: list[str], timeout: float = 30, env: dict[str, str] | None = None) -> None:
    """A config checker (``nginx -t``, ``haproxy -c``, ``caddy validate``, ``lbproxy
    check-config``) accepts the generated file."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def run_bench(
    *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bench`` in its own process group; on timeout kill the whole group
    (the bench keeps its children in its group, so nothing is left running)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"bench timed out after {timeout}s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_metrics(scenario: str, target: str, metrics: dict[str, object]) -> None:
    where = f"{scenario}/{target}"
    assert metrics, f"{where}: no metrics"
    for key, value in metrics.items():
        assert isinstance(value, int | float) and not isinstance(value, bool), (where, key, value)
    main = metrics[MAIN_METRIC[scenario]]
    assert isinstance(main, int | float) and main > 0, (where, main)
    if scenario == "workers_scaling":
        check_scaling_metrics(metrics)
        return
    if scenario == "failover":
        check_failover_metrics(metrics)
    if target != "direct":
        cpu = metrics["proxy_cpu_us"]
        assert isinstance(cpu, int | float) and cpu > 0, (where, "proxy_cpu_us", cpu)
    if scenario in ("http_rps", "ws_connect_rate", "ws_echo_small", "ws_echo_bulk"):
        assert metrics["p99_ms"] >= metrics["p50_ms"] > 0, (where, metrics)  # type: ignore[operator]
    if scenario == "idle_ws_memory":
        assert metrics["conns_full"] == 1000 and metrics["dropped"] == 0, (where, metrics)
    if scenario == "reconnect_storm":
        assert metrics["reconnected"] == metrics["clients"] == 1000, (where, metrics)


def check_failover_metrics(m: dict[str, object]) -> None:
    """failover (quick: 100 clients): recovered in a finite time, sane integer counts."""
    recover = m["recover_s"]
    assert isinstance(recover, float) and 0 < recover < 10 and math.isfinite(recover), m
    assert 0 < m["recover_p50_s"] <= recover, m  # type: ignore[operator]
    for key in ("failed_handshakes", "lost_echoes", "in_flight_at_kill", "reconnected"):
        value = m[key]
        assert isinstance(value, int | float) and value >= 0 and value == int(value), (key, m)
    assert m["on_killed"] + m["on_survivor"] == 100 and m["on_killed"] > 0, m  # type: ignore[operator]
    assert m["reconnected"] >= m["on_killed"] == m["killed_closed"], m  # type: ignore[operator]
    assert m["in_flight_at_kill"] <= m["killed_closed"], m  # type: ignore[operator]  # depth 1
    assert m["failed_handshakes"] == m["hs_5xx"] + m["hs_other_status"] + m["hs_resets"], m  # type: ignore[operator]
    # paced (QUICK.failover_pace_ms): each client at most one message per pace, not a closed loop
    assert 0 < m["msgs_per_s"] <= 100 * 1000 / QUICK.failover_pace_ms * 1.05, m  # type: ignore[operator]


def check_scaling_metrics(m: dict[str, object]) -> None:
    """workers_scaling (lbproxy only): a full connect-rate window with 1 and with 2 workers."""
    for key in ("conn_per_s", "proxy_cpu_us", "proxy_cpu_pct", "cpu0_busy_pct", "cpu1_busy_pct"):
        for suffix in ("_1w", "_2w"):
            value = m[key + suffix]
            assert isinstance(value, int | float) and value > 0, (key + suffix, m)
    for suffix in ("_1w", "_2w"):
        assert m["p99_ms" + suffix] >= m["p50_ms" + suffix] > 0, m  # type: ignore[operator]
    assert m["processes_1w"] == 1 and m["processes_2w"] == 3, m  # 2 workers + the supervisor
    # the supervisor is never on the data path: a few % of a core at most, also when loaded
    assert 0 <= m["supervisor_cpu_pct_2w"] < 15, m  # type: ignore[operator]
    assert "supervisor_cpu_pct_1w" not in m, m
    assert m["scaling"] == pytest.approx(m["conn_per_s_2w"] / m["conn_per_s_1w"], rel=1e-2)  # type: ignore[operator]
    assert m["worker_share_min_2w"] > 0.25, m  # type: ignore[operator]  # both workers served
    busiest = 1 - m["worker_share_min_2w"]  # type: ignore[operator]
    projected = m["proxy_cpu_us_1w"] / m["proxy_cpu_us_2w"] / busiest  # type: ignore[operator]
    assert m["projected_scaling"] == pytest.approx(projected, rel=2e-2), m


@needs_tools
@pytest.mark.timeout(260)
def test_quick_bench_measures_every_scenario_on_every_target(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_bench("--quick", "--out", str(out), timeout=200)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"machine", "scenarios"}
    assert data["machine"]["pinning"]["proxy"].startswith("CPU 1")
    quick = default_scenarios(quick=True)
    assert "failover" in quick and "caddy" in TARGETS
    assert set(data["scenarios"]) == set(quick)
    for scenario, per_target in data["scenarios"].items():
        assert set(per_target) == set(targets_for(scenario, TARGETS)), scenario
        for target, metrics in per_target.items():
            check_metrics(scenario, target, metrics)
    report = (out / "report.md").read_text()
    for name in (
        *SCENARIOS,
        "lbproxy/nginx",
        "lbproxy/haproxy",
        "lbproxy/caddy",
        "nginx-default.conf",
        "haproxy-bulk.cfg",
        "lbproxy.toml",
        "lbproxy-workers.toml",
        "lbproxy only",
        "caddy.caddyfile",
        "caddy-failover.caddyfile",
        "nginx-failover.conf",
        "haproxy-failover.cfg",
        "lbproxy-failover.toml",
        "in_flight_at_kill",
    ):
        assert name in report, name
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "main_metrics.png" in pngs and "proxy_cpu.png" in pngs, pngs
    assert all((out / p).stat().st_size > 1000 for p in pngs)


def test_missing_tools_are_named_and_exit_non_zero(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # nothing on PATH
    proc = run_bench(
        "--quick",
        "--out",
        str(tmp_path / "out"),
        "--targets",
        "direct,nginx,haproxy,caddy",
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    for tool in ("gcc", "taskset", "nginx", "haproxy", "caddy"):
        assert tool in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_bench("--targets", "direct,envoy", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "envoy" in proc.stderr


@pytest.mark.parametrize("bulk", [False, True])
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_generated_nginx_config_is_valid(tmp_path: Path, bulk: bool) -> None:
    spec = proxy_spec("nginx", tmp_path, Ports(listen=1, backend=2, admin=3), bulk=bulk)
    assert spec.config_path is not None
    text = spec.config_path.read_text()
    assert "127.0.0.1:1 " in text and "127.0.0.1:2;" in text and "@" not in text
    assert ("proxy_buffer_size 64k" in text) is bulk
    cmd = [c for c in spec.command if c not in ("-g", "daemon off;")]
    assert_accepted([*cmd, "-t"])


@pytest.mark.parametrize("bulk", [False, True])
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_generated_haproxy_config_is_valid(tmp_path: Path, bulk: bool) -> None:
    spec = proxy_spec("haproxy", tmp_path, Ports(listen=1, backend=2, admin=3), bulk=bulk)
    assert spec.config_path is not None
    text = spec.config_path.read_text()
    assert "bind 127.0.0.1:1 " in text and "server b1 127.0.0.1:2" in text
    assert ("tune.bufsize 65536" in text) is bulk
    assert_accepted(["haproxy", "-c", "-f", str(spec.config_path)])


def test_generated_lbproxy_config_is_valid(tmp_path: Path) -> None:
    spec = proxy_spec("lbproxy", tmp_path, Ports(listen=1, backend=2, admin=3), bulk=True)
    assert spec.config_path is not None and spec.command[1:4] == ("-m", "lbproxy", "serve")
    assert_accepted(
        [sys.executable, "-m", "lbproxy", "check-config", str(spec.config_path)], timeout=60
    )


def test_generated_lbproxy_workers_config_is_valid(tmp_path: Path) -> None:
    ports = Ports(listen=1, backend=2, admin=3)
    spec = lbproxy_workers_spec(tmp_path, ports, workers=2)
    assert spec.config_path is not None and spec.command[-2:] == ("--workers", "2")
    text = spec.config_path.read_text()
    assert '"127.0.0.1:1"' in text and '"127.0.0.1:3"' in text and "@" not in text
    assert_accepted(
        [sys.executable, "-m", "lbproxy", "check-config", str(spec.config_path)], timeout=60
    )


def test_free_port_run_gives_consecutive_free_ports() -> None:
    first = free_port_run(2, avoid=())
    for port in (first, first + 1):  # both can be bound (worker 1's admin API is admin + 1)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def scaling_outcome() -> RunOutcome:
    outcome = RunOutcome()
    outcome.results["ws_connect_rate"] = {
        t: {"conn_per_s": 1000.0, "proxy_cpu_us": 100.0} for t in ("direct", "lbproxy", "nginx")
    }
    outcome.results["ws_connect_rate"]["lbproxy"] = {"conn_per_s": 500.0, "proxy_cpu_us": 300.0}
    outcome.results["workers_scaling"] = {
        "lbproxy": {
            "conn_per_s_1w": 4000.0,
            "conn_per_s_2w": 6000.0,
            "proxy_cpu_us_1w": 200.0,
            "proxy_cpu_us_2w": 220.0,
            "scaling": 1.5,
        }
    }
    return outcome


def test_lbproxy_only_scenario_is_complete_without_other_targets() -> None:
    outcome = scaling_outcome()
    scenarios = ["ws_connect_rate", "workers_scaling"]
    assert incomplete(outcome, ["direct", "lbproxy", "nginx"], scenarios) == []
    assert incomplete(outcome, ["direct", "nginx"], ["workers_scaling"]) == []  # not run at all
    del outcome.results["workers_scaling"]["lbproxy"]["scaling"]
    assert incomplete(outcome, ["lbproxy"], scenarios) == ["workers_scaling/lbproxy"]


def test_report_tables_mark_the_lbproxy_only_scenario() -> None:
    outcome = scaling_outcome()
    summary = [line for line in summary_table(outcome) if line.startswith("| workers_scaling")]
    assert [line.split(" | ")[1] for line in summary] == [
        "scaling ↑",
        "conn_per_s_1w ↑",
        "conn_per_s_2w ↑",
        "proxy_cpu_us_1w ↓",
        "proxy_cpu_us_2w ↓",
    ]
    only = "| lbproxy only | lbproxy only | lbproxy only |"  # nginx, haproxy, caddy
    assert all(line.endswith(only) for line in summary), summary
    other = next(line for line in summary_table(outcome) if "ws_connect_rate | conn" in line)
    assert other.endswith("| 0.50 | — | — |"), other  # ratios still computed elsewhere
    table = scenario_table("workers_scaling", outcome.results["workers_scaling"])
    assert "lbproxy only" in table[0] and "nginx" not in "\n".join(table)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert rows["conn_per_s ↑"].endswith("| 4,000 | 6,000 | 1.50 |"), rows
    assert rows["proxy_cpu_us ↓"].endswith("| 200 | 220 | 1.10 |"), rows
    assert rows["scaling ↑"].endswith("| 1.5 |"), rows


FAILOVER_PORTS = Ports(listen=1, backend=2, admin=3, backend2=4)


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy not installed")
@pytest.mark.parametrize("variant", ["", "failover"])
def test_generated_caddy_config_is_valid(tmp_path: Path, variant: str) -> None:
    spec = proxy_spec("caddy", tmp_path, FAILOVER_PORTS, bulk=False, variant=variant)
    assert spec.config_path is not None
    assert spec.command[:2] == ("env", "GOMAXPROCS=1") and "caddy" in spec.command
    text = spec.config_path.read_text()
    assert "http://:1 {" in text and "bind 127.0.0.1" in text and "auto_https off" in text
    assert "admin off" in text and "@" not in text
    assert ("127.0.0.1:4" in text) is bool(variant)  # the second backend only for failover
    assert ("health_uri /" in text and "fail_duration" in text) is bool(variant)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    assert_accepted(
        ["caddy", "validate", "--adapter", "caddyfile", "--config", str(spec.config_path)], env=env
    )


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_generated_nginx_failover_config_is_valid(tmp_path: Path) -> None:
    spec = proxy_spec("nginx", tmp_path, FAILOVER_PORTS, bulk=False, variant="failover")
    assert spec.config_path is not None
    text = spec.config_path.read_text()
    for line in ("127.0.0.1:2 max_fails=1", "127.0.0.1:4 max_fails=1", "proxy_next_upstream"):
        assert line in text, line
    cmd = [c for c in spec.command if c not in ("-g", "daemon off;")]
    assert_accepted([*cmd, "-t"])


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_generated_haproxy_failover_config_is_valid(tmp_path: Path) -> None:
    spec = proxy_spec("haproxy", tmp_path, FAILOVER_PORTS, bulk=False, variant="failover")
    assert spec.config_path is not None
    text = spec.config_path.read_text()
    assert "server b1 127.0.0.1:2 check" in text and "server b2 127.0.0.1:4 check" in text
    assert "option redispatch" in text and "inter 1s" in text
    assert_accepted(["haproxy", "-c", "-f", str(spec.config_path)])


def test_generated_lbproxy_failover_config_is_valid(tmp_path: Path) -> None:
    spec = proxy_spec("lbproxy", tmp_path, FAILOVER_PORTS, bulk=False, variant="failover")
    assert spec.config_path is not None
    text = spec.config_path.read_text()
    assert '"127.0.0.1:2"' in text and '"127.0.0.1:4"' in text and 'check = "http"' in text
    assert_accepted(
        [sys.executable, "-m", "lbproxy", "check-config", str(spec.config_path)], timeout=60
    )


def test_failover_config_needs_a_second_backend(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two backend ports"):
        proxy_spec("nginx", tmp_path, Ports(listen=1, backend=2, admin=3), False, "failover")


def test_limits_scenario_uses_the_limits_config_only_when_lbproxy_accepts_it(
    tmp_path: Path,
) -> None:
    """ws_echo_small_limits: the [pools.be.websocket] keys when check-config takes them (this
    lbproxy does), else the plain ws_echo_small config (and the pair says limits are off)."""
    spec, limits = scenario_spec("lbproxy", "ws_echo_small_limits", tmp_path, FAILOVER_PORTS)
    assert spec.config_path is not None
    limits_conf = tmp_path / "lbproxy-limits.toml"
    assert "[pools.be.websocket]" in limits_conf.read_text()
    accepted = subprocess.run(
        [sys.executable, "-m", "lbproxy", "check-config", str(limits_conf)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert limits is (accepted.returncode == 0)
    assert limits, accepted.stdout  # (SPEC 11 is implemented: the keys are accepted)
    assert spec.config_path.name == ("lbproxy-limits.toml" if limits else "lbproxy.toml")
    assert ("[pools.be.websocket]" in spec.config_path.read_text()) is limits
    plain, off = scenario_spec("lbproxy", "ws_echo_small", tmp_path, FAILOVER_PORTS)
    assert off is False and plain.config_path is not None
    assert plain.config_path.name == "lbproxy.toml"


def test_quick_default_leaves_out_the_limits_scenario() -> None:
    assert parse_args(["--quick"]).scenarios == [
        s
        for s in SCENARIOS
        if s not in ("ws_echo_small_limits", "ws_connect_rate_limits", "upgrade")
    ]
    assert parse_args([]).scenarios == list(SCENARIOS)
    named = parse_args(["--quick", "--scenarios", "ws_echo_small_limits"])
    assert named.scenarios == ["ws_echo_small_limits"]


def test_admission_scenario_config_has_redis_limits_lbproxy_accepts(tmp_path: Path) -> None:
    spec, _ = scenario_spec("lbproxy", "ws_connect_rate_limits", tmp_path, FAILOVER_PORTS)
    assert spec.config_path is not None
    assert spec.config_path.name == "lbproxy-admission.toml"
    text = spec.config_path.read_text()
    assert 'scope = "redis"' in text
    assert f"redis://127.0.0.1:{FAILOVER_PORTS.backend2}/0" in text
    assert lbproxy_accepts(spec.config_path)
    assert targets_for("failover", TARGETS) == ["lbproxy", "nginx", "haproxy", "caddy"]
    assert targets_for("ws_echo_small_limits", TARGETS) == ["lbproxy"]


def test_parse_ready_line() -> None:
    assert parse_ready("READY 100 49 51") == (100, 49, 51)
    for bad in ("READY 100 49", "OPEN 1 2 3", "READY a b c"):
        with pytest.raises(ValueError):
            parse_ready(bad)


def failover_result(**over: float) -> dict[str, object]:
    res: dict[str, object] = {
        "killed": 1,
        "recover_s": 0.25,
        "recover_p50_s": 0.125,
        "recovered": 10,
        "failed_handshakes": 3,
        "hs_5xx": 2,
        "hs_other_status": 0,
        "hs_resets": 1,
        "lost_echoes": 0,
        "in_flight_at_kill": 4,
        "survivor_closed": 0,
        "killed_closed": 5,
        "reconnected": 5,
        "on_killed": 5,
        "on_survivor": 5,
        "errors": 0,
        "ops_per_s": 1234.5,
        "p50_us": 1500,
        "p99_us": 9000,
    }
    res.update(over)
    return res


def test_failover_metrics_from_the_generator_result() -> None:
    m = failover_metrics(failover_result(), clients=10)
    assert m["recover_s"] == 0.25 and m["recover_p50_s"] == 0.125
    assert m["failed_handshakes"] == 3 and m["hs_5xx"] == 2
    assert m["in_flight_at_kill"] == 4 and m["lost_echoes"] == 0 and m["on_killed"] == 5
    assert m["p50_ms"] == 1.5 and m["p99_ms"] == 9.0 and m["msgs_per_s"] == 1234.5


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"killed": 0}, "never saw the kill"),
        ({"recover_s": -1, "recovered": 7}, "only 7 of 10 clients"),
        ({"recovered": 9}, "only 9 of 10 clients"),
        ({"hs_resets": 0}, "failed_handshakes 3.0 != 2.0"),
    ],
)
def test_failover_metrics_refuse_a_run_that_says_nothing(
    over: dict[str, float], message: str
) -> None:
    with pytest.raises((RuntimeError, ValueError), match=message):
        failover_metrics(failover_result(**over), clients=10)


def test_report_has_caddy_ratios_and_the_limits_note_table() -> None:
    outcome = RunOutcome()
    outcome.results["failover"] = {
        "lbproxy": {"recover_s": 0.2, "lost_echoes": 0.0, "in_flight_at_kill": 50.0},
        "nginx": {"recover_s": 0.1, "lost_echoes": 0.0, "in_flight_at_kill": 50.0},
        "caddy": {"recover_s": 0.4, "lost_echoes": 0.0, "in_flight_at_kill": 50.0},
    }
    summary = summary_table(outcome)
    assert summary[0].endswith("| lbproxy/nginx | lbproxy/haproxy | lbproxy/caddy |")
    row = next(line for line in summary if "| recover_s" in line)
    assert row.endswith("| 2.00 | — | 0.50 |"), row
    no_direction = next(line for line in summary if "| in_flight_at_kill" in line)
    assert no_direction.endswith("|  |  |  |"), no_direction
    limits = {"msgs_per_s": 900.0, "proxy_cpu_us": 22.0, "limits_on": 0.0}
    plain = {"msgs_per_s": 1000.0, "proxy_cpu_us": 20.0}
    table = scenario_table("ws_echo_small_limits", {"lbproxy": limits}, plain)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert rows["proxy_cpu_us ↓"].endswith("| 22 | 20 | 1.10 |"), rows
    assert rows["limits_on"].endswith("| 0 | — |  |"), rows
    assert "limits off: same as ws_echo_small" in LIMITS_MISSING


PERF_DSO_REPORT = """\
# Overhead  Shared Object
    61.50%  [kernel.kallsyms]
    20.25%  libpython3.11.so.1.0
     8.00%  loop.cpython-311-x86_64-linux-gnu.so
     5.00%  _splice.cpython-311-x86_64-linux-gnu.so
     3.00%  libc.so.6
     2.25%  nginx
"""


def test_profile_splits_perf_samples_into_binaries() -> None:
    shares = profile.dso_shares(PERF_DSO_REPORT)
    assert shares == {
        "kernel": 61.5,
        "Python interpreter": 20.25,
        "uvloop": 8.0,
        "native engine (_splice)": 5.0,
        "libc": 3.0,
        "nginx": 2.25,
    }


def test_profile_counts_system_calls_per_accepted_connection(tmp_path: Path) -> None:
    raw = tmp_path / "x.strace"
    raw.write_text(
        "% time     seconds  usecs/call     calls    errors syscall\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        " 50.00    0.000500          10       600           sendto\n"
        " 30.00    0.000300          10       200       200 connect\n"
        " 20.00    0.000200          10       200           accept4\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        "100.00    0.001000          10      1000       200 total\n"
    )
    text = profile.strace_summary(raw, ops=250)  # ops counted over a longer window
    assert "system calls per accepted connection: 5.00" in text
    assert "3.000  sendto" in text and "1.000  connect" in text


@needs_tools
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
@pytest.mark.timeout(120)
def test_profile_strace_reports_the_proxys_system_calls(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("--quick", "--targets", "lbproxy", "--scenarios", "ws_connect_rate")
    proc = run_bench(*args, "--profile", "strace", "--out", str(out), timeout=100)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    text = (out / "profiles" / "ws_connect_rate-lbproxy-strace.txt").read_text()
    head = re.search(r"system calls per accepted connection: ([\d.]+)", text)
    assert head is not None, text
    # a websocket connection through the proxy: at least accept, connect, the head and the
    # 101 both ways, the message both ways, and closing both sockets
    assert 10 < float(head.group(1)) < 80, text
    assert re.search(r"^\s+1\.000  accept4$", text, re.M), text
