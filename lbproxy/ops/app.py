"""The supervisor: builds the components from a Config, handles signals, reloads, drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

from prometheus_client import CollectorRegistry

from lbproxy import __version__
from lbproxy.cluster.shared import Cluster
from lbproxy.config.load import load_config
from lbproxy.config.types import Address, AdminConfig, Config, ListenerConfig
from lbproxy.core.pool import Pool
from lbproxy.core.shared_counts import SharedCounts
from lbproxy.errors import ConfigError
from lbproxy.ops.admin import AdminServer, UpgradeHook
from lbproxy.ops.app_types import BalancerView, Role
from lbproxy.ops.drain import Drainer, close_spread
from lbproxy.ops.fdreserve import FdReserve, reserve_size
from lbproxy.ops.fdreserve import create as create_fd_reserve
from lbproxy.ops.health import HealthChecker
from lbproxy.ops.metrics import backend_totals, build_registry
from lbproxy.ops.pool_sync import dump_stats
from lbproxy.ops.stats import SAMPLE_INTERVAL, History, Stats
from lbproxy.ops.upgrade_state import NO_UPGRADE
from lbproxy.ops.worker_role import WorkerRole
from lbproxy.ops.workers import WorkerLink
from lbproxy.proxy.listener import Listener
from lbproxy.proxy.splice import native_available
from lbproxy.proxy.tunnel import GRACE
from lbproxy.registry.watcher import RegistryWatcher

log = logging.getLogger("lbproxy")


class App:
    """One lbproxy process (role "single"), or with ``serve --workers N`` the supervisor's
    part (no listener) or a worker's (listeners; pools follow the supervisor's snapshots)."""

    def __init__(
        self,
        config: Config,
        *,
        reuse_port: bool = False,
        log_json: bool = False,
        role: Role = "single",
        counts: SharedCounts | None = None,
        link: WorkerLink | None = None,
        view: BalancerView | None = None,
    ) -> None:
        self.role: Role = role
        self.counts = counts
        self.link = link
        self.view = view
        self.started = time.time()
        self.config = config
        self.reuse_port = reuse_port
        self.log_json = log_json
        self.stats = Stats()
        self.pools: dict[str, Pool] = {}
        self.listeners: dict[str, Listener] = {}
        self.retired: list[Listener] = []  # removed by a reload, still carrying connections
        self.health: dict[str, HealthChecker] = {}
        self.drainer = Drainer()
        self.watcher: RegistryWatcher | None = None
        self.admin: AdminServer | None = None
        self.admin_address: Address | None = None
        self.stopping = asyncio.Event()
        self.fds: FdReserve | None = None  # descriptors kept for the admin API and health checks
        self.history = History()
        self._sampler: asyncio.Task[None] | None = None
        self.worker = WorkerRole(self, link) if link is not None else None
        self.cluster = Cluster(lambda: self.pools, self.stats, role, counts)
        self.generation = 1  # (the supervisor's: one more per lbproxy upgrade)
        self.drain_limit = float("inf")  # (an old generation's bound on its drain)
        self.upgrade: UpgradeHook | None = None  # POST /api/upgrade (the supervisor's)

    # -- building ------------------------------------------------------------
    def _admin_config(self, config: Config) -> AdminConfig:
        return config.admin

    async def start(self) -> None:
        config = self.config
        for name, pool_config in config.pools.items():
            self._add_pool(name, Pool(pool_config))
        if self.worker is not None:
            await self.worker.start()
        else:
            await self._sync_watcher(config)
            await self._await_first_snapshot(config)  # no listener accepts before this
        self.fds = create_fd_reserve(self._fd_reserve)
        await self.cluster.apply(config)
        if self.role != "supervisor":
            for name, listener_config in config.listeners.items():
                await self._add_listener(name, listener_config)
        self._sampler = asyncio.get_running_loop().create_task(self._sample())
        if self.role == "worker":
            if self.worker is not None:
                self.worker.listening()
            return
        for pool in self.pools.values():
            await self._start_health(pool)
        view = self.view
        registry = build_registry(
            lambda: self.pools,
            self.stats if view is None else view.stats,
            self._listener_counts if view is None else view.listeners,
            self.watcher,
            self._native_counts if view is None else view.native,
        )
        self.admin = self._admin_server(config, registry)
        self.admin_address = await self.admin.start()
        log.info("admin API on http://%s", self.admin_address)
        if self.watcher is not None:
            self.watcher.set_own_addresses(self._own_addresses(config))

    def _admin_server(self, config: Config, registry: CollectorRegistry) -> AdminServer:
        args = (lambda: self.pools, registry, self.history, self.info)
        return AdminServer(self._admin_config(config), *args, upgrade=self.upgrade)

    def _listener_counts(self) -> dict[str, int]:
        return {n: len(lst.connections) for n, lst in self.listeners.items()}

    def _native_counts(self) -> dict[str, int]:
        return {n: lst.native_tunnels() for n, lst in self.listeners.items()}

    def info(self) -> dict[str, object]:
        """GET /api/info: this balancer and its workers."""
        if self.view is not None:
            workers = self.view.workers()
        else:
            held = sum(len(lst.connections) for lst in self.all_listeners())
            accepted = sum(self.stats.connections_total.values())
            workers = [{"pid": os.getpid(), "connections": held, "accepted": accepted}]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "workers": workers,
            "generation": self.generation,
            "started": self.started,
        }

    def _fd_reserve(self) -> int:
        checked = sum(
            len(p.backends) for p in self.pools.values() if p.config.health.check != "none"
        )
        return reserve_size(self.config.admin.max_connections, checked)

    def _add_pool(self, name: str, pool: Pool) -> None:
        self.pools[name] = pool
        pool.share(self.counts)
        self.drainer.watch(pool)
        if self.worker is not None:
            pool.subscribe(self.worker.forward_down)

    async def _add_listener(self, name: str, config: ListenerConfig) -> None:
        listener = Listener(
            config,
            self.pools[config.pool],
            self.stats,
            reuse_port=self.reuse_port,
            log_json=self.log_json,
            fds=self.fds,
            sharing=self.cluster,
        )
        inherited = None if self.worker is None else self.worker.inherited.pop(name, None)
        await listener.start(inherited)
        self.listeners[name] = listener

    async def _start_health(self, pool: Pool) -> None:
        checker = HealthChecker(pool, self.stats)
        self.health[pool.name] = checker
        await checker.start()

    async def _await_first_snapshot(self, config: Config) -> None:
        if self.watcher is None or config.redis is None:
            return
        timeout = config.redis.start_timeout
        if not await self.watcher.wait_loaded(timeout):
            log.warning(
                "registry: no snapshot from Redis within %.1fs ([redis] start_timeout); "
                "accepting with the backends known so far",
                timeout,
            )

    def _own_addresses(self, config: Config) -> list[Address]:
        """Where this lbproxy listens (bound addresses once known): never a backend."""
        own = [lst.config.bind for lst in self.all_listeners()]
        own += [lst.address for lst in self.all_listeners() if lst.address is not None]
        own += [lc.bind for lc in config.listeners.values()]
        own.append(self._admin_config(config).listen)
        if self.admin_address is not None:
            own.append(self.admin_address)
        return own

    async def _sync_watcher(self, config: Config) -> None:
        wants = config.redis is not None and any(
            p.discovery == "redis" for p in config.pools.values()
        )
        if wants and config.redis is not None:
            if self.watcher is None:
                self.watcher = RegistryWatcher(
                    config.redis, self.pools, own_addresses=self._own_addresses(config)
                )
                await self.watcher.start()
            else:
                self.watcher.update_pools(self.pools)
                self.watcher.set_own_addresses(self._own_addresses(config))
        elif self.watcher is not None:
            await self.watcher.stop()
            self.watcher = None

    # -- reload --------------------------------------------------------------
    async def reload(self, path: str) -> bool:
        """SIGHUP: re-read the config; apply it or keep the running one."""
        try:
            new = load_config(path)
        except ConfigError as exc:
            for line in exc.problems:
                log.error("reload rejected: %s", line)
            return False
        await self.apply(new)
        log.warning("configuration reloaded from %s", path)
        return True

    async def apply(self, new: Config) -> None:
        old_pools = dict(self.pools)
        for name, pool_config in new.pools.items():
            pool = old_pools.get(name)
            if pool is None:
                pool = Pool(pool_config)
                self._add_pool(name, pool)
                if self.role != "worker":
                    await self._start_health(pool)
            else:
                pool.apply_config(pool_config)
                if name in self.health:
                    self.health[name].reconfigure(pool)
        for name in set(old_pools) - set(new.pools):
            pool = self.pools.pop(name)
            for backend_id in list(pool.backends):
                pool.remove(backend_id, "pool removed from configuration")
            checker = self.health.pop(name, None)
            if checker is not None:
                await checker.stop()
        await self.cluster.apply(new)
        if self.role != "supervisor":
            await self._apply_listeners(new)
        if self.role != "worker":
            await self._sync_watcher(new)
        if self.admin is not None and self._admin_config(new) != self._admin_config(self.config):
            await self.admin.stop()
            self.admin = self._admin_server(new, self.admin.registry)
            self.admin_address = await self.admin.start()
        if self.watcher is not None:
            self.watcher.set_own_addresses(self._own_addresses(new))
        self.config = new

    async def _apply_listeners(self, new: Config) -> None:
        for name, config in new.listeners.items():
            current = self.listeners.get(name)
            same_socket = current is not None and (
                current.config.bind == config.bind
                and current.config.mode == config.mode
                and current.config.tls == config.tls
            )
            if current is not None and same_socket:
                current.update(config, self.pools[config.pool])
                continue
            if current is not None:
                self._retire(current)
            await self._add_listener(name, config)
        for name in set(self.listeners) - set(new.listeners):
            self._retire(self.listeners.pop(name))

    def _retire(self, listener: Listener) -> None:
        listener.stop_accepting()
        self.retired.append(listener)

    # -- shutdown ------------------------------------------------------------
    def all_listeners(self) -> list[Listener]:
        return [*self.listeners.values(), *self.retired]

    async def shutdown(self) -> None:
        """Stop accepting, let connections finish up to drain_timeout, then 1001 them."""
        listeners = self.all_listeners()
        for listener in listeners:
            listener.stop_accepting()
        for listener in listeners:
            listener.finish_requests()  # idle keep-alive: close now; in flight: after the response
        pools = list(self.pools.values())
        drain = max((p.config.drain_timeout for p in pools), default=0.0)
        drain = min(drain, self.drain_limit)
        spread = max((p.config.close_spread for p in pools), default=0.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while loop.time() < deadline and any(lst.connections for lst in listeners):
            await asyncio.sleep(0.05)
        remaining = [c for lst in listeners for c in lst.connections]
        if remaining:
            log.info("closing %d connection(s) over %.1fs", len(remaining), spread)
            await close_spread(remaining, spread)
            deadline = loop.time() + GRACE
            while loop.time() < deadline and any(lst.connections for lst in listeners):
                await asyncio.sleep(0.05)
        await self.stop()

    async def _sample(self) -> None:
        """Once a second: live byte counts into the stats, a point of every backend's history."""
        loop = asyncio.get_running_loop()
        while True:
            for listener in self.all_listeners():
                listener.flush_bytes()
            if self.link is not None:
                self._report(self.link)
            else:
                stats = self.stats if self.view is None else self.view.stats()
                self.history.record(loop.time(), time.time(), backend_totals(self.pools, stats))
            await asyncio.sleep(SAMPLE_INTERVAL)

    def _report(self, link: WorkerLink) -> None:
        report = {"t": "stats", "stats": dump_stats(self.stats)}
        link.send({**report, "listeners": self._listener_counts(), "native": self._native_counts()})

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        await self.drainer.stop()
        await self.cluster.stop()
        if self.link is not None:  # (a last report: what this worker counted is not lost)
            for listener in self.all_listeners():
                listener.flush_bytes()
            self._report(self.link)
            self.link.close()
        for checker in self.health.values():
            await checker.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        for listener in self.all_listeners():
            await listener.stop()
        if self.admin is not None:
            await self.admin.stop()

    # -- running -------------------------------------------------------------
    async def run(self, path: str) -> int:
        """Serve until SIGTERM/SIGINT (graceful drain; a second one exits at once)."""
        loop = asyncio.get_running_loop()
        await self.start()
        reloads: set[asyncio.Task[bool]] = set()
        signals = 0

        def on_stop() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second stop signal: exiting now")
                os._exit(0)
            self.stopping.set()

        def on_hup() -> None:
            task = loop.create_task(self.reload(path))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        if self.role == "worker":
            # Ctrl-C or a hangup reach the whole process group: the supervisor turns them into
            # one SIGTERM (drain) or one reload order per worker
            loop.add_signal_handler(signal.SIGTERM, on_stop)
            for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_IGN)
        else:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_stop)
            loop.add_signal_handler(signal.SIGHUP, on_hup)
            loop.add_signal_handler(signal.SIGUSR2, lambda: log.error(NO_UPGRADE))
        if not native_available() and os.environ.get("LBPROXY_SPLICE") != "0":
            log.warning(
                "the native tunnel engine (lbproxy/_splice.c) is not built: "
                "tunnels run in Python (install gcc and the Python headers, then `make native`)"
            )
        log.warning("lbproxy %s ready (pid %d)", __version__, os.getpid())
        try:
            await self.stopping.wait()
            log.warning("stopping: draining connections")
            await self.shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
        log.warning("stopped")
        return 0
