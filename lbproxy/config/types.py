"""Frozen configuration values (README "Configuration"; config/lbproxy.toml shows every key).

Loading and validation live in load.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_WEIGHT = 256  # backend weights are integers 1..MAX_WEIGHT (config, CLI and registry)


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # "127.0.0.1", "::1", "localhost" (no brackets)
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address = Address("127.0.0.1", 9901)
    token: str = ""
    allowed_hosts: tuple[str, ...] = ()  # Host names besides admin.listen/localhost (canonical)
    max_connections: int = 64  # open admin connections; beyond: 503 and close
    upgrade_timeout: float = 10.0  # lbproxy upgrade: the old generation is gone after this


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "lbproxy"
    start_timeout: float = 5.0  # listeners accept once the first snapshot is loaded, or after this


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """[listeners.NAME.limits]: per-client admission (README "Admission control")."""

    connections_per_ip: int = 0  # concurrent connections per client IP (0 = off)
    rate_per_ip: float = 0.0  # new connections per second per client IP (0 = off)
    burst: int = 0  # new connections allowed at once (0 = rate_per_ip rounded up, at least 1)
    scope: Literal["local", "redis"] = "local"  # "redis": shared by every instance

    @property
    def enabled(self) -> bool:
        return self.connections_per_ip > 0 or self.rate_per_ip > 0


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    bind: Address
    pool: str
    mode: Literal["http", "tcp"] = "http"
    handshake_timeout: float = 10.0
    idle_timeout: float = 3600.0
    max_connections: int = 50000
    trusted_proxies: tuple[IPNetwork, ...] = ()
    proxy_protocol: Literal["", "v1", "v2"] = ""
    tls: TlsConfig | None = None
    keepalive_timeout: float = 75.0  # an idle client connection between requests is closed
    body_timeout: float = 60.0  # a request body with no byte for this long is answered 408
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    check: Literal["tcp", "http", "websocket", "none"] = "tcp"
    path: str = "/healthz"
    interval: float = 1.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 2
    passive_failures: int = 3


@dataclass(frozen=True, slots=True)
class WebsocketConfig:
    """[pools.NAME.websocket] (SPEC 11; ws_rules applies it). 0 = off."""

    ping_interval: float = 0.0  # client silent this long: a ping
    ping_timeout: float = 10.0  # then silent this long more: dead (TCP closed, backend 1001)
    max_message: int = 0  # bytes of one client message (all fragments): over -> 1009
    max_messages_per_second: float = 0.0  # client data messages per connection: over -> 1008
    burst: int = 0  # messages allowed at once above the rate (0 = one second's worth)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    id: str
    address: Address
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RebalanceConfig:
    """[pools.NAME.rebalance]: move websockets off overloaded backends (README)."""

    max_imbalance: float = 0.0  # 0 = off; else close while a backend holds > this x average
    closes_per_second: float = 10.0


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    balance: Literal["least-connections", "round-robin", "hash"] = "least-connections"
    hash_key: str = "ip"  # "ip" | "cookie:NAME" | "header:NAME" | "query:NAME"
    sticky_cookie: bool = True
    hash_balance_factor: float = 1.25
    discovery: Literal["static", "redis"] = "static"
    connect_timeout: float = 2.0
    retries: int = 2
    drain_timeout: float = 30.0
    close_spread: float = 2.0
    slow_start: float = 0.0
    allowed_networks: tuple[IPNetwork, ...] = ()
    backends: tuple[BackendConfig, ...] = ()
    health: HealthConfig = field(default_factory=HealthConfig)
    sticky_secret: str = ""  # HMAC key of the sticky cookies ("" = derived from the pool name)
    affinity_linger: float = 10.0  # seconds a key stays remembered after its last connection
    response_timeout: float = 30.0  # no response head within it: 504 (and a passive failure)
    upstream_keepalive_timeout: float = 4.0  # idle upstream connections closed after it
    websocket: WebsocketConfig = field(default_factory=WebsocketConfig)
    least_connections_scope: Literal["local", "cluster"] = "local"  # "cluster": Redis counts
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    admin: AdminConfig
    redis: RedisConfig | None
    listeners: dict[str, ListenerConfig]
    pools: dict[str, PoolConfig]
