"""The proxies under test: their generated configs and how to start them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("direct", "lbproxy", "nginx", "haproxy", "caddy")
PEERS = ("nginx", "haproxy", "caddy")  # the report gives lbproxy/PEER ratios
TEMPLATES = Path(__file__).resolve().parent / "templates"
NGINX_BULK_BUFFERS = (
    "            proxy_buffer_size 64k;        # bulk variant: tunnel buffer 64k (default 4k)\n"
    "            proxy_buffers 4 64k;          # only to satisfy the busy_buffers check"
)
HAPROXY_BULK_TUNE = "    tune.bufsize 65536            # bulk variant (default 16384)"
# failover: two backends, each target's health checking as its docs recommend; the active
# checkers (HAProxy, Caddy, lbproxy) all probe every 1 s with a 0.5 s timeout.
NGINX_FAILOVER = (
    "            proxy_next_upstream error timeout;  # failover: next server on connect failure\n"
    "            proxy_connect_timeout 1s;"
)
HAPROXY_FAILOVER = """\
    balance roundrobin
    option httpchk GET /
    timeout check 500ms
    retries 2
    option redispatch 1           # every retry may go to another server
    default-server inter 1s fall 2 rise 2
    server b1 127.0.0.1:{b1} check
    server b2 127.0.0.1:{b2} check"""
CADDY_FAILOVER = """\
		lb_policy round_robin
		# retry another upstream when a dial fails (no retries by default)
		lb_try_duration 5s
		lb_try_interval 250ms
		# active health checks
		health_uri /
		health_interval 1s
		health_timeout 500ms
		health_status 2xx
		# passive health checks: a failed dial marks the upstream down for fail_duration
		fail_duration 10s
		max_fails 1
		unhealthy_status 5xx"""
LBPROXY_FAILOVER_HEALTH = """\
check = "http"                  # failover: active checks of GET / every 1 s
path = "/"
interval = 1.0
timeout = 0.5
rise = 2
fall = 2
passive_failures = 1            # and passive: one failed proxied connect marks it down"""
# the [pools.NAME.websocket] keys for ws_echo_small_limits (pings, limits; message metrics
# are always on): only used when `lbproxy check-config` accepts them (see
# limits_supported).
LBPROXY_LIMITS = """
[pools.be.websocket]            # ws_echo_small_limits: pings and limits on, never reached
ping_interval = 30.0
ping_timeout = 10.0
max_message = 1048576
max_messages_per_second = 100000
burst = 100000"""
LBPROXY_SINGLE_NOTE = "one process (no --workers), pinned to CPU 1 by taskset."
LBPROXY_WORKERS_NOTE = (
    "workers_scaling: --workers 1, then --workers 2 (SO_REUSEPORT on the\n"
    "# listen port), not pinned (CPUs 0-1); worker k serves its admin API on the admin port + k."
)


@dataclass(frozen=True)
class Ports:
    listen: int
    backend: int
    admin: int
    backend2: int = 0  # failover: the second backend (the one killed)


@dataclass(frozen=True)
class ProxySpec:
    """What to run for one target in one scenario (``command`` is empty for ``direct``)."""

    target: str
    command: tuple[str, ...]
    config_path: Path | None
    variant: str  # "default", "bulk", "failover" or "limits"


def render(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        if not value:  # an empty value removes a line that holds only its placeholder
            text = text.replace(f"@{key}@\n", "")
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"{template}: unfilled placeholders {sorted(set(left))}")
    return text


def lbproxy_command(config: Path) -> tuple[str, ...]:
    return (
        sys.executable,
        "-m",
        "lbproxy",
        "serve",
        "--config",
        str(config),
        "--log-level",
        "warning",
    )


def backend_ports(ports: Ports, failover: bool) -> list[int]:
    if failover and not ports.backend2:
        raise ValueError("failover needs two backend ports")
    return [ports.backend, ports.backend2] if failover else [ports.backend]


def nginx_spec(run_dir: Path, ports: Ports, variant: str, values: dict[str, str]) -> ProxySpec:
    (run_dir / "nginx-tmp").mkdir(exist_ok=True)
    path = run_dir / f"nginx-{variant}.conf"
    failover = variant == "failover"
    fails = " max_fails=1 fail_timeout=10s" if failover else ""  # passive checks (OSS nginx)
    values["SERVERS"] = "\n".join(
        f"        server 127.0.0.1:{p}{fails};" for p in backend_ports(ports, failover)
    )
    bulk = variant == "bulk"
    values["BUFFERS"] = NGINX_BULK_BUFFERS if bulk else "            # default buffers"
    values["FAILOVER"] = NGINX_FAILOVER if failover else ""
    path.write_text(render("nginx.conf", values))
    cmd = ("nginx", "-p", str(run_dir), "-c", str(path), "-e", str(run_dir / "nginx-error.log"))
    return ProxySpec("nginx", (*cmd, "-g", "daemon off;"), path, variant)


def haproxy_spec(run_dir: Path, ports: Ports, variant: str, values: dict[str, str]) -> ProxySpec:
    path = run_dir / f"haproxy-{variant}.cfg"
    values["TUNE"] = (
        HAPROXY_BULK_TUNE if variant == "bulk" else "    # default tune.bufsize (16384)"
    )
    values["SERVERS"] = (
        HAPROXY_FAILOVER.format(b1=ports.backend, b2=ports.backend2)
        if variant == "failover"
        else f"    server b1 127.0.0.1:{ports.backend}"
    )
    path.write_text(render("haproxy.cfg", values))
    return ProxySpec("haproxy", ("haproxy", "-db", "-f", str(path)), path, variant)


def caddy_spec(run_dir: Path, ports: Ports, variant: str, values: dict[str, str]) -> ProxySpec:
    """Caddy (Debian package) with GOMAXPROCS=1; its data/config dirs inside the run dir.
    No bulk variant: Caddy has no tunnel buffer setting (upgraded streams use its copy buffer)."""
    failover = variant == "failover"
    path = run_dir / ("caddy-failover.caddyfile" if failover else "caddy.caddyfile")
    values["UPSTREAMS"] = " ".join(f"127.0.0.1:{p}" for p in backend_ports(ports, failover))
    values["OPTIONS"] = CADDY_FAILOVER if failover else "\t\t# defaults (one upstream)"
    path.write_text(render("caddy.caddyfile", values))
    env = ("env", "GOMAXPROCS=1", f"XDG_DATA_HOME={run_dir}", f"XDG_CONFIG_HOME={run_dir}")
    cmd = ("caddy", "run", "--adapter", "caddyfile", "--config", str(path))
    return ProxySpec("caddy", (*env, *cmd), path, "failover" if failover else "default")


def lbproxy_spec(run_dir: Path, ports: Ports, variant: str, values: dict[str, str]) -> ProxySpec:
    failover = variant == "failover"
    names = {"failover": "lbproxy-failover.toml", "limits": "lbproxy-limits.toml"}
    path = run_dir / names.get(variant, "lbproxy.toml")
    values["RUN_NOTE"] = LBPROXY_SINGLE_NOTE
    ids = ("b1", "b2")
    values["BACKENDS"] = lbproxy_backends(
        [(ids[k], p) for k, p in enumerate(backend_ports(ports, failover))]
    )
    values["HEALTH"] = LBPROXY_FAILOVER_HEALTH if failover else 'check = "none"'
    values["WEBSOCKET"] = LBPROXY_LIMITS if variant == "limits" else ""
    path.write_text(render("lbproxy.toml", values))
    return ProxySpec(
        "lbproxy", lbproxy_command(path), path, variant if variant != "bulk" else "default"
    )


def lbproxy_backends(backends: list[tuple[str, int]]) -> str:
    items = ", ".join(f'{{ id = "{i}", address = "127.0.0.1:{p}" }}' for i, p in backends)
    return f"backends = [ {items} ]"


def proxy_spec(
    target: str, run_dir: Path, ports: Ports, bulk: bool, variant: str = ""
) -> ProxySpec:
    """Write ``target``'s config for these ports into ``run_dir`` and return how to start it.
    ``variant``: "" (default, or "bulk" with ``bulk``), "failover" (two backends, health
    checks; needs ``ports.backend2``) or "limits" (lbproxy with the websocket keys)."""
    variant = variant or ("bulk" if bulk else "default")
    values = {
        "RUN": str(run_dir),
        "LISTEN_PORT": str(ports.listen),
        "BACKEND_PORT": str(ports.backend),
        "ADMIN_PORT": str(ports.admin),
    }
    builders = {
        "nginx": nginx_spec,
        "haproxy": haproxy_spec,
        "caddy": caddy_spec,
        "lbproxy": lbproxy_spec,
    }
    if target == "direct":
        return ProxySpec(target, (), None, variant)
    if target not in builders:
        raise ValueError(f"unknown target {target!r}")
    return builders[target](run_dir, ports, variant, values)


def lbproxy_workers_spec(run_dir: Path, ports: Ports, workers: int) -> ProxySpec:
    """lbproxy with ``--workers N``: the listen port must be fixed (not 0) and the admin ports
    ``ports.admin`` .. ``ports.admin + N - 1`` free (worker k's admin API is on admin + k)."""
    path = run_dir / "lbproxy-workers.toml"
    values = {
        "RUN_NOTE": LBPROXY_WORKERS_NOTE,
        "LISTEN_PORT": str(ports.listen),
        "BACKEND_PORT": str(ports.backend),
        "ADMIN_PORT": str(ports.admin),
        "BACKENDS": lbproxy_backends([("b1", ports.backend)]),
        "HEALTH": 'check = "none"',
        "WEBSOCKET": "",
    }
    path.write_text(render("lbproxy.toml", values))
    command = (*lbproxy_command(path), "--workers", str(workers))
    return ProxySpec("lbproxy", command, path, f"workers-{workers}")


def tool_version(args: list[str]) -> str:
    """First line mentioning a version from ``args`` (stdout or stderr), or "missing"."""
    if shutil.which(args[0]) is None and not Path(args[0]).exists():
        return "missing"
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    text = (proc.stdout + proc.stderr).strip()
    return text.splitlines()[0].strip() if text else f"exit {proc.returncode}"


def lbproxy_available() -> tuple[bool, str]:
    """Whether ``python -m lbproxy --version`` works (the serve command comes with it)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lbproxy", "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    out = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, out.splitlines()[-1] if out else f"exit {proc.returncode}"


def lbproxy_accepts(config: Path) -> bool:
    """Whether ``lbproxy check-config`` accepts ``config`` (exit 0)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lbproxy", "check-config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0
