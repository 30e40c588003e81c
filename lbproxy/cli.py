"""The `lbproxy` command line (click)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from lbproxy import __version__
from lbproxy.config.load import load_config, parse_address
from lbproxy.config.types import MAX_WEIGHT, Address, Config
from lbproxy.errors import ConfigError

T = TypeVar("T")
DEFAULT_ADMIN = "http://127.0.0.1:9901"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (LBPROXY_LOOP=asyncio forces the stdlib loop)."""
    if os.environ.get("LBPROXY_LOOP") == "asyncio":
        return asyncio.run(coro)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


def _load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(line, err=True)
        sys.exit(2)


def _address(text: str, what: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: {exc}", param_hint=what) from exc


@click.group()
@click.version_option(__version__, prog_name="lbproxy")
def main() -> None:
    """lbproxy: a websocket-aware L4/L7 load balancer."""


class WorkerCount(click.ParamType):  # type: ignore[type-arg]
    """``--workers``: a number from 1 to 64, or ``auto`` (the CPUs this process may use)."""

    name = "N|auto"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return max(1, min(64, len(os.sched_getaffinity(0))))
        try:
            count = int(text)
        except ValueError:
            self.fail(f"{value!r}: a number from 1 to 64, or auto", param, ctx)
        if not 1 <= count <= 64:
            self.fail(f"{value!r}: a number from 1 to 64, or auto", param, ctx)
        return count


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--workers",
    default="1",
    show_default=True,
    type=WorkerCount(),
    help="worker processes of the one balancer (auto: one per CPU)",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option(
    "--log-format", default="text", show_default=True, type=click.Choice(["text", "json"])
)
@click.option("--worker-index", default=-1, hidden=True, type=int)
@click.option("--control-fd", default=-1, hidden=True, type=int)
@click.option("--counts", "counts_spec", default="", hidden=True)
@click.option("--rows", default=0, hidden=True, type=int)
@click.option("--handover-fd", default=-1, hidden=True, type=int)
@click.option("--adopt-fd", default=-1, hidden=True, type=int)
@click.option("--resume-fd", default=-1, hidden=True, type=int)
def serve(
    config_path: str,
    workers: int,
    log_level: str,
    log_format: str,
    worker_index: int,
    control_fd: int,
    counts_spec: str,
    rows: int,
    handover_fd: int,
    adopt_fd: int,
    resume_fd: int,
) -> None:
    """Run the load balancer until SIGTERM/SIGINT (then drain and exit 0).

    SIGHUP reloads the configuration; SIGUSR2 (or `lbproxy upgrade`) starts the lbproxy
    code now installed without closing a connection (with --workers 2 or more)."""
    from lbproxy.logsetup import setup_logging

    config = _load_or_exit(config_path)
    setup_logging(log_level, log_format)
    if workers > 1 and worker_index < 0:
        from lbproxy.ops.supervisor import Supervisor
        from lbproxy.ops.upgrade_state import read_resume

        resume = read_resume(resume_fd) if resume_fd >= 0 else None
        supervisor = Supervisor(config, config_path, workers, log_level, log_format, resume)
        sys.exit(run_async(supervisor.run()))
    from lbproxy.ops.app import App

    if worker_index < 0 or control_fd < 0 or ":" not in counts_spec:
        app = App(config, log_json=log_format == "json")  # --workers 1: one process as ever
        sys.exit(run_async(app.run(config_path)))
    from lbproxy.core.shared_counts import SharedCounts
    from lbproxy.ops.workers import WorkerLink

    counts_fd, row = (int(part) for part in counts_spec.split(":", 1))
    link = WorkerLink(control_fd)
    link.handover_fd, link.adopt_fd = handover_fd, adopt_fd
    app = App(
        config,
        reuse_port=True,
        log_json=log_format == "json",
        role="worker",
        counts=SharedCounts.attach(counts_fd, rows, row),
        link=link,
    )
    sys.exit(run_async(app.run(config_path)))


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a configuration file: exit 0 when valid, else 2 with one line per problem."""
    config = _load_or_exit(path)
    click.echo(f"{path}: ok ({len(config.listeners)} listener(s), {len(config.pools)} pool(s))")


@main.command()
@click.option("--listen", required=True, help="HOST:PORT to serve on (port 0: any free port)")
@click.option("--id", "backend_id", default=None, help="backend id (default backend-PORT)")
@click.option("--redis", "redis_url", default=None, help="register in Redis at this URL")
@click.option("--prefix", default="lbproxy", show_default=True)
@click.option("--pool", default="chat", show_default=True)
@click.option("--advertise", default=None, help="HOST:PORT registered in Redis (default --listen)")
@click.option("--drain-seconds", default=10.0, show_default=True, type=float)
@click.option(
    "--ttl",
    default=6.0,
    show_default=True,
    type=click.FloatRange(min=1.0),
    help="registration TTL in Redis (heartbeat every ttl/3)",
)
@click.option(
    "--rate",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="chat messages per second per user, shared by all backends",
)
@click.option("--burst", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--presence-ttl", default=6.0, show_default=True, type=click.FloatRange(min=0.5))
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--history-seconds",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=1.0),
    help="chat history kept per room for this long (resume with since)",
)
@click.option(
    "--history-max",
    default=100_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="and at most this many messages per room",
)
def backend(
    listen: str,
    backend_id: str | None,
    redis_url: str | None,
    prefix: str,
    pool: str,
    advertise: str | None,
    drain_seconds: float,
    ttl: float,
    rate: float,
    burst: int,
    presence_ttl: float,
    log_level: str,
    history_seconds: float,
    history_max: int,
) -> None:
    """Run the reference chat/echo backend."""
    from lbproxy.backend.server import BackendOptions, run_backend
    from lbproxy.logsetup import setup_logging

    setup_logging(log_level)
    address = _address(listen, "--listen")
    options = BackendOptions(
        listen=address,
        id=backend_id or "",  # "" -> backend-<bound port>
        redis_url=redis_url,
        prefix=prefix,
        pool=pool,
        advertise=_address(advertise, "--advertise") if advertise else None,
        drain_seconds=drain_seconds,
        ttl=ttl,
        rate=rate,
        burst=burst,
        presence_ttl=presence_ttl,
        history=history_max,
        history_seconds=history_seconds,
    )
    run_backend(options)


@main.command()
@click.option("--redis", "redis_url", required=True)
@click.option("--prefix", default="lbproxy", show_default=True)
@click.option("--pool", required=True)
@click.option("--address", required=True, help="HOST:PORT lbproxy should connect to")
@click.option("--id", "backend_id", default=None)
@click.option("--weight", default=1, show_default=True, type=click.IntRange(1, MAX_WEIGHT))
@click.option("--ttl", default=6.0, show_default=True, type=click.FloatRange(min=1.0))
@click.option(
    "--drain-first",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="on SIGTERM, mark draining and wait this long before deregistering",
)
def register(
    redis_url: str,
    prefix: str,
    pool: str,
    address: str,
    backend_id: str | None,
    weight: int,
    ttl: float,
    drain_first: float,
) -> None:
    """Keep an external backend registered in Redis until SIGTERM/SIGINT."""
    from lbproxy.logsetup import setup_logging
    from lbproxy.registry.register import run_register

    setup_logging("info")
    _address(address, "--address")
    sys.exit(
        run_async(
            run_register(redis_url, prefix, pool, address, backend_id, weight, ttl, drain_first)
        )
    )


def _token(token: str | None) -> str:
    return token or os.environ.get("LBPROXY_ADMIN_TOKEN", "")


token_option = click.option(
    "--token", default=None, help="admin bearer token (default: $LBPROXY_ADMIN_TOKEN)"
)


@main.command()
@click.option("--admin", "admin_url", default=DEFAULT_ADMIN, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the raw /api/pools JSON")
@token_option
def status(admin_url: str, as_json: bool, token: str | None) -> None:
    """Show pools and backends (client of the admin API)."""
    from lbproxy.ops import admin_client

    sys.exit(admin_client.status(admin_url, as_json, _token(token)))


@main.command()
@click.argument("pool")
@click.argument("backend_id")
@click.option("--admin", "admin_url", default=DEFAULT_ADMIN, show_default=True)
@token_option
def drain(pool: str, backend_id: str, admin_url: str, token: str | None) -> None:
    """Drain a backend: no new connections; open ones get drain_timeout, then 1001."""
    from lbproxy.ops import admin_client

    sys.exit(admin_client.drain(admin_url, pool, backend_id, _token(token)))


@main.command()
@click.argument("pool")
@click.argument("backend_id")
@click.option("--admin", "admin_url", default=DEFAULT_ADMIN, show_default=True)
@token_option
def enable(pool: str, backend_id: str, admin_url: str, token: str | None) -> None:
    """Return a drained backend to service."""
    from lbproxy.ops import admin_client

    sys.exit(admin_client.enable(admin_url, pool, backend_id, _token(token)))


@main.command()
@click.option("--admin", "admin_url", default=DEFAULT_ADMIN, show_default=True)
@token_option
def upgrade(admin_url: str, token: str | None) -> None:
    """Load the lbproxy code now installed without closing a connection (serve --workers 2+).

    Exit 0 once the new generation serves, 1 if it failed to start (the old one serves on),
    2 if the configuration is invalid (nothing changed)."""
    from lbproxy.ops import admin_client

    sys.exit(admin_client.upgrade(admin_url, _token(token)))


@main.command()
def demo() -> None:
    """Redis + three registered backends + lbproxy; prints the URLs; Ctrl-C stops all."""
    from lbproxy.demo import run_demo

    sys.exit(run_demo())
