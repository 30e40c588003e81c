"""Free ports (one slice per pytest-xdist worker) and polling with a deadline."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# Test ports come from a range below the kernel's ephemeral range (32768-60999 here), so an
# outgoing connection's local port never takes a port a test is about to bind, and each
# pytest-xdist worker has its own slice, so parallel workers never hand out the same port.
# (The bench draws its ports from 10000-32000; the slices stay below that.)
# LBPROXY_TEST_PORT_FIRST / LBPROXY_TEST_PORT_SLICE move the slices, so that two test runs on
# one machine (two clones) do not hand out the same ports.
_PORT_FIRST = int(os.environ.get("LBPROXY_TEST_PORT_FIRST", "2000"))
_PORT_SLICE = int(os.environ.get("LBPROXY_TEST_PORT_SLICE", "1600"))


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = worker.removeprefix("gw")
    return int(digits) % 5 if digits.isdigit() else 0


def _port_cycle() -> Iterator[int]:
    first = _PORT_FIRST + _worker_index() * _PORT_SLICE
    while True:
        yield from range(first, first + _PORT_SLICE)


_PORTS = _port_cycle()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, from this test process's own slice, not handed out recently.

    Ports are handed out in turn through the slice, so a port comes back only after the
    others of the slice were given.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(_PORT_SLICE):
        port = next(_PORTS)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in this worker's slice for {host}")


def wait_until(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> object:
    """Poll ``cond`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # keep polling until the deadline
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last_exc!r})")


async def await_until(
    cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
