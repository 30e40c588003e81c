"""Child processes pinned with taskset and stopped by PID, and /proc readings of them."""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
BOTH_CPUS = "0-1"  # taskset list for a process left free to run on either core


class Child:
    """One process started by the bench (in the bench's process group, so that killing the
    bench's group also kills every child, e.g. when a test times out)."""

    def __init__(self, name: str, popen: subprocess.Popen[str], log_path: Path | None) -> None:
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader: threading.Thread | None = None
        if popen.stdout is not None:
            self.reader = threading.Thread(target=self._read_lines, daemon=True)
            self.reader.start()

    def _read_lines(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def expect(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with ``prefix`` (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {prefix!r} line within {timeout:.0f}s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited (rc={self.popen.wait()}) before {prefix!r}")
            if line.startswith(prefix):
                return line

    def send_line(self, text: str = "") -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def log_tail(self, chars: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process; after ``grace``, SIGKILL it and every descendant seen, by PID."""
        family = [identity(pid) for pid in tree_pids(self.pid)] if self.alive() else []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        if self.alive():
            family += [identity(pid) for pid in tree_pids(self.pid)]
        for pid, started in family:
            if started and identity(pid) == (pid, started):  # still that process, not a reused PID
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        if self.reader is not None:  # the process is gone: its stdout reaches EOF
            self.reader.join(timeout=5)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class ChildSet:
    """Every child started through it is stopped by PID on exit, whatever happened."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(
        self, name: str, args: Sequence[str], cpu: int | str, interactive: bool = False
    ) -> Child:
        """Start ``args`` pinned to ``cpu`` (a CPU or a taskset list such as ``BOTH_CPUS``;
        taskset execs, so the PID is the program's)."""
        cmd = ["taskset", "-c", str(cpu), *args]
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
                stdout=subprocess.PIPE if interactive else log,
                stderr=log,
                text=True,
                cwd=self.log_dir,
            )
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def __enter__(self) -> ChildSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


# ---------- /proc readings ----------


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (via /proc/PID/task/TID/children)."""
    pids: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    todo.extend(
                        int(p)
                        for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                    )
    return pids


def identity(pid: int) -> tuple[int, int]:
    """(pid, start time in ticks since boot); start time 0 when the process is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return pid, int(stat[stat.rindex(")") + 2 :].split()[19])
    return pid, 0


def cpus_allowed(pid: int) -> str:
    """The ``Cpus_allowed_list`` of ``pid`` (e.g. "1"), or "" when it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    return ""


def check_pinned(pids: Sequence[int], cpu: int | str) -> None:
    """Raise unless every live process in ``pids`` may run on ``cpu`` only (a CPU, or a list
    written as /proc shows it, e.g. "0-1").

    A process just started through ``taskset`` may still be the forked child of this
    (CPU 0 pinned) driver for a moment, before taskset has set its mask and exec'd: the
    check polls for up to 2 s before it calls the pinning wrong.
    """
    deadline = time.monotonic() + 2.0
    while True:
        wrong = {pid: cpus_allowed(pid) for pid in pids}
        wrong = {pid: allowed for pid, allowed in wrong.items() if allowed not in ("", str(cpu))}
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pinning not applied (want CPU {cpu}): {wrong}")
        time.sleep(0.01)


def cpu_ticks(pids: Sequence[int]) -> int:
    """Sum of utime + stime (clock ticks) of ``pids``; vanished processes count 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    return total


def fd_count(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def cpu_busy_jiffies() -> dict[str, tuple[int, int]]:
    """Per CPU (``cpu0``, ``cpu1``...): (busy, total) jiffies from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *rest = line.split()
        if name.startswith("cpu") and name != "cpu":
            vals = [int(v) for v in rest]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            out[name] = (sum(vals[:8]) - idle, sum(vals[:8]))
    return out


@dataclass(frozen=True)
class Sample:
    """CPU ticks of each process group and per-CPU jiffies at one moment."""

    when: float
    ticks: dict[str, int]
    cpus: dict[str, tuple[int, int]]


def take_sample(groups: Mapping[str, Sequence[int]]) -> Sample:
    return Sample(
        when=time.monotonic(),
        ticks={name: cpu_ticks(pids) for name, pids in groups.items()},
        cpus=cpu_busy_jiffies(),
    )


def poll_until(cond: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``cond`` until true or ``timeout``; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get_ok(port: int, path: str = "/") -> bool:
    """One GET through ``port`` answered by a 200 (proves proxy and backend both work)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def http_get(port: int, path: str, timeout: float = 3.0) -> bytes:
    """The whole raw response to one ``GET path`` with Connection: close (b"" on error)."""
    chunks: list[bytes] = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError:
        return b""
    return b"".join(chunks)


def free_port_run(count: int, avoid: Sequence[int] = ()) -> int:
    """A port P such that P .. P+count-1 are all free now and none is in ``avoid``.

    Drawn below the ephemeral range (32768-60999 here), where a storm of client
    connections and their TIME_WAIT leftovers cannot leave it no room.
    """
    rng = random.Random()
    for _ in range(500):
        first = rng.randrange(10000, 32000)
        run = range(first, first + count)
        if first + count > 65536 or any(p in avoid for p in run):
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in run:
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    # like the servers' listen sockets: a port in TIME_WAIT (after 9,000
                    # storm connections most are) can still be listened on
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise RuntimeError(f"no run of {count} free ports found")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
