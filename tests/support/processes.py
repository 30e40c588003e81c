"""Real processes started by tests and stopped by PID: redis-server, backends, lbproxy."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.ports import free_port, port_open, wait_until


class Proc:
    """A subprocess started by a test and killed by PID at the end."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.args = args
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix="lbproxy-test-", suffix=".log", delete=False
        )
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            args,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        # children in its session (e.g. --workers) too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


def lbproxy_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lbproxy", *args]


class RedisServer:
    """A real redis-server on a free loopback port, nothing persisted."""

    def __init__(self, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found on PATH (the test command installs it)")
        self.exe = exe
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="lbproxy-redis-")
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = Proc(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--daemonize",
                "no",
            ]
        )
        wait_until(lambda: port_open(self.port), timeout=10)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGKILL)
            self.proc.wait()
            self.proc.stop()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Backend:
    """A reference backend (`lbproxy backend`) subprocess on a free port."""

    def __init__(self, backend_id: str, port: int | None = None, *extra: str) -> None:
        self.id = backend_id
        self.port = port or free_port()
        self.extra = extra
        self.proc: Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Backend:
        self.proc = Proc(
            lbproxy_cmd(
                "backend",
                "--listen",
                self.address,
                "--id",
                self.id,
                "--log-level",
                "warning",
                *self.extra,
            )
        )
        try:
            wait_until(lambda: port_open(self.port), timeout=15)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


ENGINES = ("native", "python")  # the tunnel engines: the C engine and the Python tunnel


def engine_env(engine: str) -> dict[str, str]:
    """The environment that makes an lbproxy use ``engine`` ("native" or "python")."""
    if engine not in ENGINES:
        raise ValueError(f"unknown tunnel engine {engine!r}: one of {ENGINES}")
    return {"LBPROXY_SPLICE": "1" if engine == "native" else "0"}


class Lbproxy:
    """An `lbproxy serve` subprocess with a config written from a TOML string.

    The one way tests start an lbproxy: ``engine`` picks the tunnel engine (see the
    ``engine`` fixture), ``env`` adds variables, ``prefix`` runs it under a wrapper such as
    ``("prlimit", "--nofile=64:64")``; ``start(wait_ports=...)`` returns once those ports
    accept (or fails with its log if it exited).
    """

    def __init__(
        self,
        config_text: str,
        workdir: Path,
        *extra: str,
        name: str = "lbproxy",
        env: dict[str, str] | None = None,
        engine: str | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.path = workdir / f"{name}.toml"
        self.path.write_text(config_text)
        self.extra = extra
        self.env = {**(engine_env(engine) if engine else {}), **(env or {})} or None
        self.prefix = tuple(prefix)
        self.proc: Proc | None = None

    def start(self, wait_ports: tuple[int, ...] = ()) -> Lbproxy:
        self.proc = Proc(
            [*self.prefix, *lbproxy_cmd("serve", "--config", str(self.path), *self.extra)],
            env=self.env,
        )
        try:
            for port in wait_ports:
                wait_until(lambda p=port: port_open(p) or not self.proc.alive(), timeout=15)  # type: ignore[union-attr]
                assert self.proc.alive(), self.proc.output()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=10)
            self.proc = None
