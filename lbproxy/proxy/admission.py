"""One listener's admission control: the pure limits (limits.py) in this process, and with
``scope = "redis"`` the shared ones (limits_redis.py). Connections call ``check`` once when
they arrive and ``closed`` once when they end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from lbproxy.cluster.limits_redis import RedisLimits
from lbproxy.config.types import LimitsConfig
from lbproxy.core.limits import ADMIT, Decision, LocalLimits
from lbproxy.ops.shared_limits import SharedLimits

EXPIRE_EVERY = 1024  # admissions between two sweeps of the GCRA states in the past


class Sharing(Protocol):
    """Where the limits of an instance are shared (cluster.Cluster): ``limits`` for scope
    "redis" (rebuilt when [redis] changes), ``table`` for scope "local" with --workers N."""

    @property
    def limits(self) -> RedisLimits | None: ...
    @property
    def table(self) -> SharedLimits | None: ...


class Admission:
    """``scope = "redis"``: decided by the instance's RedisLimits (batched Redis calls)."""

    __slots__ = ("_since_expire", "config", "local", "loop", "name", "sharing")

    def __init__(
        self,
        name: str,
        config: LimitsConfig,
        sharing: Sharing | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name = name
        self.config = config
        self.local = LocalLimits(config)
        self.sharing = sharing
        self.loop = loop
        self._since_expire = 0

    def update(self, config: LimitsConfig) -> None:
        """Reload: new numbers (the counts and GCRA states are kept)."""
        self.config = self.local.config = config

    def _shared_limits(self) -> RedisLimits | None:
        sharing = self.sharing
        return sharing.limits if sharing is not None and self.config.scope == "redis" else None

    def _table(self) -> SharedLimits | None:
        sharing = self.sharing
        return sharing.table if sharing is not None and self.config.scope == "local" else None

    def check(
        self, ip: str, done: Callable[[Decision], None], *, count: bool = True
    ) -> Decision | None:
        """The decision for a new connection from ``ip`` (admitted ones are counted open
        when ``count``), or None: ``done`` gets it later (shared limits: a Redis call)."""
        self._since_expire += 1
        if self._since_expire >= EXPIRE_EVERY:
            self._since_expire = 0
            self.local.expire(self.loop.time())
        shared = self._shared_limits()
        if shared is None:
            table = self._table()
            if table is not None:
                return table.admit(self.name, ip, self.loop.time(), self.config, count)
            return self.local.admit(ip, self.loop.time(), count=count)
        own = self.local.opened(ip) - 1 if count else 0  # (reserved while Redis decides)
        config = self.config
        if not shared.up:  # fail open: admitted, counted here (written when Redis is back)
            if count and config.connections_per_ip:
                shared.set_count(self.name, ip, own + 1)
            return ADMIT
        if not count and config.connections_per_ip:
            config = LimitsConfig(0, config.rate_per_ip, config.burst, config.scope)

        def settle(decision: Decision) -> None:
            if count and not decision.admitted:
                self.local.closed(ip)
            elif count and config.connections_per_ip:  # (the script wrote own + 1)
                shared.set_count(self.name, ip, self.local.open.get(ip, 0), written=True)
            done(decision)

        shared.submit(self.name, ip, config, own, settle)
        return None

    def adopt(self, ip: str) -> None:
        """A counted connection of ``ip`` moved in from the previous generation (lbproxy
        upgrade): counted open here, nothing decided; its old worker released it."""
        table = self._table()
        if table is not None:
            table.adopt(self.name, ip, self.loop.time())
            return
        opened = self.local.opened(ip)
        shared = self._shared_limits()
        if shared is not None and self.config.connections_per_ip:
            shared.set_count(self.name, ip, opened)

    def closed(self, ip: str) -> None:
        """A counted connection of ``ip`` ended."""
        table = self._table()
        if table is not None:
            table.closed(self.name, ip)
            return
        left = self.local.closed(ip)
        shared = self._shared_limits()
        if shared is not None and self.config.connections_per_ip:
            shared.set_count(self.name, ip, left)
