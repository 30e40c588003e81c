"""The proxies under test: their generated configs and how to start them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("direct", "lbproxy", "nginx", "haproxy")
TEMPLATES = Path(__file__).resolve().parent / "templates"
NGINX_BULK_BUFFERS = (
    "            proxy_buffer_size 64k;        # bulk variant: tunnel buffer 64k (default 4k)\n"
    "            proxy_buffers 4 64k;          # only to satisfy the busy_buffers check"
)
HAPROXY_BULK_TUNE = "    tune.bufsize 65536            # bulk variant (default 16384)"
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


@dataclass(frozen=True)
class ProxySpec:
    """What to run for one target in one scenario (``command`` is empty for ``direct``)."""

    target: str
    command: tuple[str, ...]
    config_path: Path | None
    variant: str  # "default" or "bulk"


def render(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
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


def proxy_spec(target: str, run_dir: Path, ports: Ports, bulk: bool) -> ProxySpec:
    """Write ``target``'s config for these ports into ``run_dir`` and return how to start it."""
    variant = "bulk" if bulk else "default"
    values = {
        "RUN": str(run_dir),
        "LISTEN_PORT": str(ports.listen),
        "BACKEND_PORT": str(ports.backend),
        "ADMIN_PORT": str(ports.admin),
    }
    if target == "direct":
        return ProxySpec(target, (), None, variant)
    if target == "nginx":
        (run_dir / "nginx-tmp").mkdir(exist_ok=True)
        path = run_dir / f"nginx-{variant}.conf"
        values["BUFFERS"] = NGINX_BULK_BUFFERS if bulk else "            # default buffers"
        path.write_text(render("nginx.conf", values))
        cmd = ("nginx", "-p", str(run_dir), "-c", str(path), "-e", str(run_dir / "nginx-error.log"))
        return ProxySpec(target, (*cmd, "-g", "daemon off;"), path, variant)
    if target == "haproxy":
        path = run_dir / f"haproxy-{variant}.cfg"
        values["TUNE"] = HAPROXY_BULK_TUNE if bulk else "    # default tune.bufsize (16384)"
        path.write_text(render("haproxy.cfg", values))
        return ProxySpec(target, ("haproxy", "-db", "-f", str(path)), path, variant)
    if target == "lbproxy":
        path = run_dir / "lbproxy.toml"
        values["RUN_NOTE"] = LBPROXY_SINGLE_NOTE
        path.write_text(render("lbproxy.toml", values))
        return ProxySpec(target, lbproxy_command(path), path, "default")
    raise ValueError(f"unknown target {target!r}")


def lbproxy_workers_spec(run_dir: Path, ports: Ports, workers: int) -> ProxySpec:
    """lbproxy with ``--workers N``: the listen port must be fixed (not 0) and the admin ports
    ``ports.admin`` .. ``ports.admin + N - 1`` free (worker k's admin API is on admin + k)."""
    path = run_dir / "lbproxy-workers.toml"
    values = {
        "RUN_NOTE": LBPROXY_WORKERS_NOTE,
        "LISTEN_PORT": str(ports.listen),
        "BACKEND_PORT": str(ports.backend),
        "ADMIN_PORT": str(ports.admin),
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
