"""What the supervisor carries across its own re-execution (``lbproxy upgrade``).

The supervisor keeps its PID: it ``execv``s the lbproxy code now installed with the same
arguments plus ``--resume-fd``, a memfd holding this state as JSON. Its workers are its
children still; their control sockets, hand-over channels and the shared count table
are descriptors left open across the exec (made inheritable just before it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("lbproxy.ops.upgrade")
NO_UPGRADE = (
    "upgrade refused: a single process cannot hand its connections over; "
    "run `lbproxy serve --workers 2` (or more) to upgrade without closing them"
)


class Child(Protocol):
    """A worker process (subprocess.Popen, or a child adopted by PID after the exec)."""

    @property
    def pid(self) -> int: ...
    def poll(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


class AdoptedChild:
    """A child this process inherited from its previous image (same PID, new code)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"pid {self.pid} still running")
            time.sleep(0.02)
        return code


@dataclass
class Resume:
    """The state handed to the re-executed supervisor."""

    generation: int
    version: int
    counts_fd: int
    rows: int
    pools: dict[str, Any]
    retired: dict[str, Any]
    workers: list[dict[str, Any]] = field(default_factory=list)
    leaving: list[dict[str, Any]] = field(default_factory=list)


def read_resume(fd: int) -> Resume:
    with os.fdopen(fd, "rb") as f:
        document = json.loads(f.read())
    return Resume(**document)


def exec_self(state: Resume, keep: list[int]) -> None:
    """Become the lbproxy code installed now, keeping ``keep`` open and this PID."""
    for fd in keep:
        os.set_inheritable(fd, True)
    memfd = os.memfd_create("lbproxy-resume", 0)  # (no CLOEXEC: the new image reads it)
    os.write(memfd, json.dumps(state.__dict__).encode())
    os.lseek(memfd, 0, os.SEEK_SET)
    args = sys.argv[1:]
    if "--resume-fd" in args:  # (a second upgrade: the previous state's descriptor is gone)
        at = args.index("--resume-fd")
        del args[at : at + 2]
    argv = [sys.executable, "-m", "lbproxy", *args, "--resume-fd", str(memfd)]
    log.warning("upgrade: re-executing the supervisor (pid %d) with the new code", os.getpid())
    # until the new image has its handlers: a reload or another upgrade signal is ignored
    # (an ignored signal stays ignored across exec; a caught one would kill it meanwhile)
    for sig in (signal.SIGHUP, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
