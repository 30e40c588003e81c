"""Load and validate the TOML configuration (README "Configuration"), reporting every problem at
once.

Each problem is one line ``PATH: dotted.key: what is wrong``.  Defaults come from the frozen
dataclasses in :mod:`lbproxy.config.types`; this module only reads, checks and assembles.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from lbproxy.addresses import parse_address
from lbproxy.config import limits as config_limits
from lbproxy.config.reader import Problems, Section, join, show
from lbproxy.config.types import (
    MAX_WEIGHT,
    Address,
    AdminConfig,
    BackendConfig,
    Config,
    HealthConfig,
    ListenerConfig,
    PoolConfig,
    RedisConfig,
    TlsConfig,
    WebsocketConfig,
)
from lbproxy.errors import ConfigError
from lbproxy.ops.admin_guard import allowed_host_entry

__all__ = ["load_config", "parse_address", "parse_config"]

_S = TypeVar("_S", bound=str)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_HASH_KEY = re.compile(r"ip|(?:cookie|header|query):[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _keys(cls: type[Any], *derived: str) -> frozenset[str]:
    """The TOML keys of a config table: its dataclass fields, minus those not read from TOML."""
    return frozenset(f.name for f in fields(cls)) - set(derived)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at ``path``; raise :class:`ConfigError` listing problems."""
    shown = os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{shown}: cannot read: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{shown}: invalid TOML: {exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{shown}: invalid TOML: not UTF-8 text ({exc.reason})"]) from exc
    return parse_config(data, shown)


def parse_config(data: Mapping[str, Any], path: str) -> Config:
    """Validate a parsed TOML document; ``path`` prefixes problems and anchors tls files."""
    problems = Problems(path)
    top = Section(data, "", problems, _keys(Config, "path"))
    admin = _admin(top, problems)
    redis_table = top.table("redis")
    redis = None if redis_table is None else _redis(redis_table, problems)
    base_dir = Path(path).parent
    listeners = {
        name: _listener(name, table, problems, base_dir)
        for name, table in _named_tables(top, "listeners", problems).items()
    }
    if not data.get("listeners") and "listeners" not in problems.keys_seen:
        problems.add("listeners", "at least one listener is required")
    pools = {
        name: _pool(name, table, problems)
        for name, table in _named_tables(top, "pools", problems).items()
    }
    _check_references(listeners, pools, problems)
    _check_binds(admin, listeners, problems)
    if redis is None:
        for pool in pools.values():
            if pool.discovery == "redis":
                problems.add(join("pools", pool.name, "discovery"), "'redis' needs a [redis] table")
        for listener in listeners.values():
            if listener.limits.scope == "redis":
                where = join("listeners", listener.name, "limits", "scope")
                problems.add(where, "'redis' needs a [redis] table")
    if problems.lines:
        raise ConfigError(problems.lines)
    return Config(path=path, admin=admin, redis=redis, listeners=listeners, pools=pools)


def _named_tables(top: Section, name: str, problems: Problems) -> dict[str, Mapping[str, Any]]:
    group = top.table(name)
    result: dict[str, Mapping[str, Any]] = {}
    for key, value in (group or {}).items():
        if isinstance(value, Mapping):
            result[key] = value
        else:
            problems.add(join(name, key), f"must be a table, got {show(value)}")
    return result


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _admin(top: Section, problems: Problems) -> AdminConfig:
    table = top.table("admin")
    defaults = AdminConfig()
    if table is None:
        return defaults
    section = Section(table, "admin", problems, _keys(AdminConfig))
    listen = section.address("listen", defaults.listen)
    token = section.string("token", defaults.token)
    if not token and not _is_loopback(listen.host):
        section.bad("token", f"required when admin.listen ({listen}) is not a loopback address")
    allowed = _allowed_hosts(section)
    max_connections = section.integer("max_connections", defaults.max_connections, 1, 65536)
    upgrade_timeout = section.number("upgrade_timeout", defaults.upgrade_timeout, zero_ok=False)
    return AdminConfig(
        listen=listen,
        token=token,
        allowed_hosts=allowed,
        max_connections=max_connections,
        upgrade_timeout=upgrade_timeout,
    )


def _allowed_hosts(section: Section) -> tuple[str, ...]:
    value = section.data.get("allowed_hosts", [])
    if not isinstance(value, list):
        section.bad("allowed_hosts", f"must be a list of host names, got {show(value)}")
        return ()
    result: list[str] = []
    for index, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise ValueError(f"must be a string, got {show(item)}")
            result.append(allowed_host_entry(item))
        except ValueError as exc:
            section.problems.add(f"{section.key('allowed_hosts')}[{index}]", str(exc))
    return tuple(result)


def _redis(table: Mapping[str, Any], problems: Problems) -> RedisConfig:
    section = Section(table, "redis", problems, _keys(RedisConfig))
    defaults = RedisConfig()
    url = section.string("url", defaults.url)
    if urlsplit(url).scheme not in _REDIS_SCHEMES:
        section.bad("url", f"must be a redis://, rediss:// or unix:// URL, got {url!r}")
    prefix = section.string("prefix", defaults.prefix)
    if not prefix or any(ch.isspace() for ch in prefix):
        section.bad("prefix", f"must be non-empty without spaces, got {prefix!r}")
    start_timeout = section.number("start_timeout", defaults.start_timeout, zero_ok=True)
    return RedisConfig(url=url, prefix=prefix, start_timeout=start_timeout)


def _tls(section: Section, base_dir: Path) -> TlsConfig | None:
    table = section.table("tls")
    if table is None:
        return None
    tls = Section(table, section.key("tls"), section.problems, _keys(TlsConfig))
    files: list[str] = []
    for name in ("cert", "key"):
        value = tls.string(name, "", required=True)
        full = os.path.abspath(base_dir / value) if value else ""
        if value and not os.path.isfile(full):
            tls.bad(name, f"no such file: {full!r}")
        files.append(full)
    return TlsConfig(cert=files[0], key=files[1])


def _listener(
    name: str, table: Mapping[str, Any], problems: Problems, base_dir: Path
) -> ListenerConfig:
    s = Section(table, join("listeners", name), problems, _keys(ListenerConfig, "name"))
    d = ListenerConfig(name=name, bind=Address("", 0), pool="")
    return ListenerConfig(
        name=name,
        bind=s.address("bind", d.bind, required=True),
        pool=s.string("pool", d.pool, required=True),
        mode=s.choice("mode", d.mode, ("http", "tcp")),
        handshake_timeout=s.number("handshake_timeout", d.handshake_timeout, zero_ok=False),
        idle_timeout=s.number("idle_timeout", d.idle_timeout, zero_ok=False),
        max_connections=s.integer("max_connections", d.max_connections, 1),
        trusted_proxies=s.networks("trusted_proxies"),
        proxy_protocol=s.choice("proxy_protocol", d.proxy_protocol, ("", "v1", "v2")),
        tls=_tls(s, base_dir),
        keepalive_timeout=s.number("keepalive_timeout", d.keepalive_timeout, zero_ok=False),
        body_timeout=s.number("body_timeout", d.body_timeout, zero_ok=False),
        limits=config_limits.limits(s),
    )


def _health(pool: Section) -> HealthConfig:
    s = Section(pool.table("health") or {}, pool.key("health"), pool.problems, _keys(HealthConfig))
    d = HealthConfig()
    path = s.string("path", d.path)
    if not path.startswith("/"):
        s.bad("path", f"must start with '/', got {path!r}")
    return HealthConfig(
        check=s.choice("check", d.check, ("tcp", "http", "websocket", "none")),
        path=path,
        interval=s.number("interval", d.interval, zero_ok=False),
        timeout=s.number("timeout", d.timeout, zero_ok=False),
        rise=s.integer("rise", d.rise, 1),
        fall=s.integer("fall", d.fall, 1),
        passive_failures=s.integer("passive_failures", d.passive_failures, 0),
    )


def _websocket(pool: Section) -> WebsocketConfig:
    table = pool.table("websocket") or {}
    s = Section(table, pool.key("websocket"), pool.problems, _keys(WebsocketConfig))
    d = WebsocketConfig()
    return WebsocketConfig(
        ping_interval=s.number("ping_interval", d.ping_interval, zero_ok=True),
        ping_timeout=s.number("ping_timeout", d.ping_timeout, zero_ok=False),
        max_message=s.integer("max_message", d.max_message, 0),
        max_messages_per_second=s.number(
            "max_messages_per_second", d.max_messages_per_second, zero_ok=True
        ),
        burst=s.integer("burst", d.burst, 0),
    )


def _backends(pool: Section) -> tuple[BackendConfig, ...]:
    value = pool.data.get("backends", [])
    if not isinstance(value, list):
        pool.bad("backends", f"must be a list of tables, got {show(value)}")
        return ()
    result: list[BackendConfig] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        where = f"{pool.key('backends')}[{index}]"
        if not isinstance(item, Mapping):
            pool.problems.add(where, f"must be a table, got {show(item)}")
            continue
        s = Section(item, where, pool.problems, _keys(BackendConfig))
        address = s.address("address", Address("", 0), required=True)
        backend_id = s.string("id", str(address))
        if not backend_id:
            s.bad("id", "must not be empty")
        elif backend_id in seen:
            s.bad("id", f"duplicate backend id {backend_id!r}")
        seen.add(backend_id)
        result.append(BackendConfig(backend_id, address, s.integer("weight", 1, 1, MAX_WEIGHT)))
    return tuple(result)


def _pool(name: str, table: Mapping[str, Any], problems: Problems) -> PoolConfig:
    s = Section(table, join("pools", name), problems, _keys(PoolConfig, "name"))
    d = PoolConfig(name=name)
    balance = s.choice("balance", d.balance, ("least-connections", "round-robin", "hash"))
    hash_key = s.string("hash_key", d.hash_key)
    if not _HASH_KEY.fullmatch(hash_key):
        wanted = "'ip', 'cookie:NAME', 'header:NAME' or 'query:NAME' (NAME a token)"
        s.bad("hash_key", f"must be {wanted}, got {hash_key!r}")
    sticky_cookie = s.boolean("sticky_cookie", d.sticky_cookie)
    factor = s.number("hash_balance_factor", d.hash_balance_factor, zero_ok=True)
    if 0 < factor < 1:
        shown = show(table["hash_balance_factor"])
        s.bad("hash_balance_factor", f"must be 0 or >= 1.0, got {shown}")
    discovery = s.choice("discovery", d.discovery, ("static", "redis"))
    if discovery == "static" and table.get("backends", []) == []:
        s.bad("backends", "a static pool needs at least one backend")
    return PoolConfig(
        name=name,
        balance=balance,
        hash_key=hash_key,
        sticky_cookie=sticky_cookie,
        hash_balance_factor=factor,
        discovery=discovery,
        connect_timeout=s.number("connect_timeout", d.connect_timeout, zero_ok=False),
        retries=s.integer("retries", d.retries, 0),
        drain_timeout=s.number("drain_timeout", d.drain_timeout, zero_ok=True),
        close_spread=s.number("close_spread", d.close_spread, zero_ok=True),
        slow_start=s.number("slow_start", d.slow_start, zero_ok=True),
        allowed_networks=s.networks("allowed_networks"),
        backends=_backends(s),
        health=_health(s),
        sticky_secret=_sticky_secret(s, d.sticky_secret),
        affinity_linger=s.number("affinity_linger", d.affinity_linger, zero_ok=True),
        response_timeout=s.number("response_timeout", d.response_timeout, zero_ok=False),
        upstream_keepalive_timeout=s.number(
            "upstream_keepalive_timeout", d.upstream_keepalive_timeout, zero_ok=False
        ),
        websocket=_websocket(s),
        least_connections_scope=s.choice(
            "least_connections_scope", d.least_connections_scope, ("local", "cluster")
        ),
        rebalance=config_limits.rebalance(s),
    )


def _sticky_secret(s: Section, default: str) -> str:
    secret = s.string("sticky_secret", default)
    if secret and len(secret) < 16:
        s.bad("sticky_secret", f"must be at least 16 characters, got {len(secret)}")
    return secret


def _check_references(
    listeners: Mapping[str, ListenerConfig], pools: Mapping[str, PoolConfig], problems: Problems
) -> None:
    for listener in listeners.values():
        key = join("listeners", listener.name, "pool")
        pool = pools.get(listener.pool)
        if key in problems.keys_seen:
            continue
        if pool is None:
            known = ", ".join(pools) or "none"
            problems.add(key, f"no pool named {listener.pool!r} (pools: {known})")
        elif listener.mode == "tcp" and pool.balance == "hash" and pool.hash_key != "ip":
            problems.add(
                key,
                f"pool {pool.name!r} hashes on {pool.hash_key!r}"
                ' but tcp mode only knows the client IP (use hash_key = "ip")',
            )


def _host_key(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host.lower()


def _same_socket(a: Address, b: Address) -> bool:
    """Whether binding both addresses would clash (port 0 = any free port never clashes)."""
    if a.port != b.port or a.port == 0 or not a.host or not b.host:
        return False
    ha, hb = _host_key(a.host), _host_key(b.host)
    if ha == hb:
        return True
    if isinstance(ha, str) or isinstance(hb, str) or ha.version != hb.version:
        return False
    return ha.is_unspecified or hb.is_unspecified


def _check_binds(
    admin: AdminConfig, listeners: Mapping[str, ListenerConfig], problems: Problems
) -> None:
    earlier: list[tuple[str, Address]] = [("admin.listen", admin.listen)]
    for listener in listeners.values():
        for owner, bound in earlier:
            if _same_socket(listener.bind, bound):
                problems.add(
                    join("listeners", listener.name, "bind"),
                    f"{listener.bind} clashes with {owner} ({bound})",
                )
                break
        earlier.append((join("listeners", listener.name, "bind"), listener.bind))
