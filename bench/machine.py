"""Facts about the machine and the software under test, recorded in results.json."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from bench.targets import lbproxy_available, tool_version

PINNING = {
    "proxy": "CPU 1 (taskset -c 1)",
    "generator": "CPU 0 (taskset -c 0)",
    "backend": "CPU 0 (taskset -c 0)",
    "bench driver": "CPU 0 (sched_setaffinity)",
    "workers_scaling": "lbproxy (1 or 2 workers), backend and generator unpinned (taskset -c 0-1)",
    "failover": "both backends on CPU 0 (taskset -c 0), the proxy on CPU 1",
}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


def lbproxy_tunnels() -> str:
    """Which tunnel lbproxy runs here: the native engine, or Python when it is not built."""
    try:
        from lbproxy.proxy.splice import native_available
    except ImportError as exc:
        return f"unknown ({exc})"
    if native_available():
        return "native engine (lbproxy/_splice.c), upstream connects for websockets included"
    return "Python (the native engine is not built)"


def machine_info(gcc: str, command: str, quick: bool, repeat: int) -> dict[str, object]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ok, lbproxy_version = lbproxy_available()
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count() or 0,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "nginx": tool_version(["nginx", "-v"]),
        "haproxy": tool_version(["haproxy", "-v"]),
        "caddy": tool_version(["caddy", "version"]),
        "gcc": tool_version([gcc, "--version"]),
        "uvloop": package_version("uvloop"),
        "lbproxy": lbproxy_version if ok else f"unavailable: {lbproxy_version}",
        "lbproxy_parser": "fast lanes + the regex head parser (lbproxy/core/http1/_fast.py); "
        "h11 is the reference the tests hold it to",
        "lbproxy_tunnels": lbproxy_tunnels(),
        "taskset": shutil.which("taskset") or "missing",
        "pinning": dict(PINNING),
        "fd_limit": f"{soft}/{hard}",
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "quick": quick,
        "repeat": repeat,
    }
