"""Configuration loading and validation: every rule reported as one exact "PATH: key: ..." line."""

from __future__ import annotations

import copy
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.config.load import load_config, parse_address, parse_config
from lbproxy.config.types import (
    Address,
    AdminConfig,
    HealthConfig,
    LimitsConfig,
    ListenerConfig,
    PoolConfig,
    RebalanceConfig,
    WebsocketConfig,
)
from lbproxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "listeners": {"public": {"bind": "127.0.0.1:8080", "pool": "chat"}},
    "pools": {"chat": {"backends": [{"id": "b1", "address": "127.0.0.1:9001"}]}},
}


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def problems_of(data: dict[str, Any], path: str = "conf.toml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def with_value(keys: tuple[str | int, ...], value: object) -> dict[str, Any]:
    """BASE with ``value`` set at the nested ``keys`` (tables created as needed)."""
    data = base()
    node: Any = data
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[keys[-1]] = value
    return data


# --- the example files ------------------------------------------------------------------------


def test_documented_example_loads_with_both_modes() -> None:
    config = load_config(REPO / "config" / "lbproxy.toml")
    assert config.path == str(REPO / "config" / "lbproxy.toml")
    assert {listener.mode for listener in config.listeners.values()} == {"http", "tcp"}
    assert config.pools["chat"].discovery == "redis"
    assert config.pools["chat"].slow_start > 0
    assert config.redis is not None
    assert config.listeners["raw"].proxy_protocol == "v2"
    assert Address("::1", 9103) in [b.address for b in config.pools["echo"].backends]


def _toml_keys(cls: type[Any], *derived: str) -> set[str]:
    return {name for name in cls.__dataclass_fields__ if name not in derived}


def test_documented_example_mentions_every_key_with_a_comment() -> None:
    text = (REPO / "config" / "lbproxy.toml").read_text()
    keys = (
        _toml_keys(AdminConfig)
        | _toml_keys(ListenerConfig, "name", "tls", "limits")
        | _toml_keys(PoolConfig, "name", "health", "backends", "websocket", "rebalance")
        | _toml_keys(HealthConfig)
        | _toml_keys(WebsocketConfig)
        | _toml_keys(LimitsConfig)
        | _toml_keys(RebalanceConfig)
        | {"url", "prefix"}
    )
    for key in keys:
        line = re.search(rf"^{key} = .*#", text, re.MULTILINE)
        assert line, f"{key} has no commented line in config/lbproxy.toml"
    assert re.search(r"^# tls = \{ cert = .*, key = .* \}$", text, re.MULTILINE)
    assert re.search(r"^slow_start = .*ramps from ~5% to", text, re.MULTILINE)
    assert re.search(r"^backends = \[\s+#", text, re.MULTILINE)


def test_static_demo_loads() -> None:
    config = load_config(REPO / "config" / "static-demo.toml")
    assert config.redis is None
    assert config.admin.listen == Address("127.0.0.1", 9901)
    (listener,) = config.listeners.values()
    assert (listener.bind, listener.mode, listener.pool) == (
        Address("127.0.0.1", 8080),
        "http",
        "chat",
    )
    chat = config.pools["chat"]
    assert (chat.balance, chat.hash_key, chat.discovery) == ("hash", "cookie:lbid", "static")
    assert [b.address.port for b in chat.backends] == [9001, 9002, 9003]
    assert (chat.health.check, chat.health.path) == ("http", "/healthz")


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_applied() -> None:
    config = parse_config(base(), "conf.toml")
    assert config.path == "conf.toml"
    assert config.admin == AdminConfig()
    assert config.redis is None
    assert config.listeners["public"] == ListenerConfig(
        name="public", bind=Address("127.0.0.1", 8080), pool="chat"
    )
    pool = config.pools["chat"]
    assert pool.name == "chat"
    assert (pool.balance, pool.hash_key, pool.sticky_cookie) == ("least-connections", "ip", True)
    assert (pool.hash_balance_factor, pool.discovery, pool.connect_timeout) == (1.25, "static", 2.0)
    assert (pool.retries, pool.drain_timeout, pool.close_spread, pool.slow_start) == (2, 30, 2, 0)
    assert pool.allowed_networks == ()
    assert pool.health == HealthConfig()
    assert pool.backends[0].weight == 1


def test_values_read_and_converted() -> None:
    data = base()
    data["redis"] = {}
    data["admin"] = {"listen": "0.0.0.0:9000", "token": "s3cret"}
    data["listeners"]["public"].update(
        trusted_proxies=["10.1.2.3/8", "::1"], idle_timeout=5, mode="tcp", proxy_protocol="v1"
    )
    data["pools"]["chat"].update(
        balance="hash", hash_key="ip", hash_balance_factor=0, discovery="redis", backends=[]
    )
    data["pools"]["chat"]["health"] = {"check": "websocket", "path": "/ws", "passive_failures": 0}
    config = parse_config(data, "conf.toml")
    listener = config.listeners["public"]
    assert listener.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert listener.idle_timeout == 5.0 and isinstance(listener.idle_timeout, float)
    assert config.admin == AdminConfig(Address("0.0.0.0", 9000), "s3cret")
    assert config.redis is not None and config.redis.prefix == "lbproxy"
    pool = config.pools["chat"]
    assert (pool.hash_balance_factor, pool.backends, pool.health.check) == (0.0, (), "websocket")


def test_backend_id_defaults_to_address_and_ipv6_addresses() -> None:
    data = with_value(
        ("pools", "chat", "backends"), [{"address": "[::1]:9001"}, {"address": "[fe80::1]:0"}]
    )
    data["listeners"]["public"]["bind"] = "[::]:8080"
    config = parse_config(data, "conf.toml")
    assert config.listeners["public"].bind == Address("::", 8080)
    assert [(b.id, b.address) for b in config.pools["chat"].backends] == [
        ("[::1]:9001", Address("::1", 9001)),
        ("[fe80::1]:0", Address("fe80::1", 0)),
    ]


def test_redis_pool_may_have_no_backends_or_static_ones() -> None:
    for backends in ([], [{"id": "x", "address": "127.0.0.1:1"}]):
        data = with_value(("pools", "chat", "discovery"), "redis")
        data["pools"]["chat"]["backends"] = backends
        data["redis"] = {"url": "unix:///tmp/redis.sock", "prefix": "lb"}
        assert len(parse_config(data, "c").pools["chat"].backends) == len(backends)


# --- parse_address ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", Address("127.0.0.1", 80)),
        ("localhost:0", Address("localhost", 0)),
        ("[::1]:65535", Address("::1", 65535)),
        ("[2001:db8::7]:443", Address("2001:db8::7", 443)),
        ("backend-1.internal:9001", Address("backend-1.internal", 9001)),
    ],
)
def test_parse_address_accepts(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "not HOST:PORT: '127.0.0.1'"),
        (":80", "not HOST:PORT: ':80'"),
        ("127.0.0.1:", "not HOST:PORT: '127.0.0.1:'"),
        ("127.0.0.1:http", "not HOST:PORT: '127.0.0.1:http'"),
        ("127.0.0.1:-1", "not HOST:PORT: '127.0.0.1:-1'"),
        ("::1:80", "not HOST:PORT: '::1:80'"),
        ("my host:80", "not HOST:PORT: 'my host:80'"),
        ("127.0.0.1:65536", "port must be 0..65535: '127.0.0.1:65536'"),
        ("[::g]:80", "not an IPv6 address in brackets: '[::g]:80'"),
        ("[127.0.0.1]:80", "not an IPv6 address in brackets: '[127.0.0.1]:80'"),
    ],
)
def test_parse_address_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert str(info.value) == message


@settings(max_examples=60, deadline=None)
@given(
    host=st.one_of(
        st.ip_addresses().map(str), st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True)
    ),
    port=st.integers(0, 65535),
)
def test_parse_address_round_trips(host: str, port: int) -> None:
    address = Address(host, port)
    assert parse_address(str(address)) == address


# --- one rule, one exact line -----------------------------------------------------------------

CASES: list[tuple[tuple[str | int, ...], object, str]] = [
    # unknown keys, at every level
    (("colour",), "red", "colour: unknown key"),
    (("admin", "colour"), "red", "admin.colour: unknown key"),
    (("listeners", "public", "colour"), "red", "listeners.public.colour: unknown key"),
    (("pools", "chat", "colour"), "red", "pools.chat.colour: unknown key"),
    (("pools", "chat", "health", "colour"), 1, "pools.chat.health.colour: unknown key"),
    (
        ("pools", "chat", "backends", 0, "colour"),
        "red",
        "pools.chat.backends[0].colour: unknown key",
    ),
    (("redis", "colour"), "red", "redis.colour: unknown key"),
    # enums
    (
        ("listeners", "public", "mode"),
        "udp",
        "listeners.public.mode: must be one of 'http', 'tcp', got 'udp'",
    ),
    (
        ("listeners", "public", "proxy_protocol"),
        "v3",
        "listeners.public.proxy_protocol: must be one of '', 'v1', 'v2', got 'v3'",
    ),
    (
        ("pools", "chat", "balance"),
        "random",
        "pools.chat.balance: must be one of 'least-connections', 'round-robin', 'hash',"
        " got 'random'",
    ),
    (
        ("pools", "chat", "discovery"),
        "dns",
        "pools.chat.discovery: must be one of 'static', 'redis', got 'dns'",
    ),
    (
        ("pools", "chat", "health", "check"),
        "icmp",
        "pools.chat.health.check: must be one of 'tcp', 'http', 'websocket', 'none', got 'icmp'",
    ),
    (
        ("listeners", "public", "mode"),
        7,
        "listeners.public.mode: must be one of 'http', 'tcp', got 7",
    ),
    # positive durations
    (
        ("pools", "chat", "health", "interval"),
        -1,
        "pools.chat.health.interval: must be a positive number, got -1",
    ),
    (
        ("pools", "chat", "health", "timeout"),
        0,
        "pools.chat.health.timeout: must be a positive number, got 0",
    ),
    (
        ("pools", "chat", "connect_timeout"),
        0.0,
        "pools.chat.connect_timeout: must be a positive number, got 0.0",
    ),
    (
        ("listeners", "public", "handshake_timeout"),
        "10",
        "listeners.public.handshake_timeout: must be a positive number, got '10'",
    ),
    (
        ("listeners", "public", "idle_timeout"),
        True,
        "listeners.public.idle_timeout: must be a positive number, got true",
    ),
    (
        ("listeners", "public", "idle_timeout"),
        float("inf"),
        "listeners.public.idle_timeout: must be a positive number, got inf",
    ),
    # non-negative durations
    (
        ("pools", "chat", "slow_start"),
        -0.5,
        "pools.chat.slow_start: must be a non-negative number, got -0.5",
    ),
    (
        ("pools", "chat", "close_spread"),
        -1,
        "pools.chat.close_spread: must be a non-negative number, got -1",
    ),
    (
        ("pools", "chat", "drain_timeout"),
        "30",
        "pools.chat.drain_timeout: must be a non-negative number, got '30'",
    ),
    # integers
    (("pools", "chat", "retries"), -1, "pools.chat.retries: must be an integer >= 0, got -1"),
    (("pools", "chat", "retries"), 1.0, "pools.chat.retries: must be an integer >= 0, got 1.0"),
    (
        ("listeners", "public", "max_connections"),
        0,
        "listeners.public.max_connections: must be an integer >= 1, got 0",
    ),
    (
        ("pools", "chat", "health", "rise"),
        0,
        "pools.chat.health.rise: must be an integer >= 1, got 0",
    ),
    (
        ("pools", "chat", "health", "fall"),
        False,
        "pools.chat.health.fall: must be an integer >= 1, got false",
    ),
    (
        ("pools", "chat", "health", "passive_failures"),
        -1,
        "pools.chat.health.passive_failures: must be an integer >= 0, got -1",
    ),
    (
        ("pools", "chat", "backends", 0, "weight"),
        0,
        "pools.chat.backends[0].weight: must be an integer from 1 to 256, got 0",
    ),
    (
        ("pools", "chat", "backends", 0, "weight"),
        257,
        "pools.chat.backends[0].weight: must be an integer from 1 to 256, got 257",
    ),
    # other types
    (
        ("pools", "chat", "sticky_cookie"),
        "yes",
        "pools.chat.sticky_cookie: must be true or false, got 'yes'",
    ),
    (("admin", "token"), 1234, "admin.token: must be a string, got 1234"),
    (
        ("listeners", "public", "pool"),
        ["chat"],
        "listeners.public.pool: must be a string, got ['chat']",
    ),
    (("pools", "chat", "health"), "http", "pools.chat.health: must be a table, got 'http'"),
    (("admin",), "127.0.0.1:1", "admin: must be a table, got '127.0.0.1:1'"),
    # hash_balance_factor
    (
        ("pools", "chat", "hash_balance_factor"),
        0.5,
        "pools.chat.hash_balance_factor: must be 0 or >= 1.0, got 0.5",
    ),
    (
        ("pools", "chat", "hash_balance_factor"),
        -1,
        "pools.chat.hash_balance_factor: must be a non-negative number, got -1",
    ),
    # addresses
    (
        ("pools", "chat", "backends", 0, "address"),
        "127.0.0.1",
        "pools.chat.backends[0].address: not HOST:PORT: '127.0.0.1'",
    ),
    (
        ("listeners", "public", "bind"),
        "127.0.0.1:99999",
        "listeners.public.bind: port must be 0..65535: '127.0.0.1:99999'",
    ),
    (("admin", "listen"), 9901, 'admin.listen: must be a string "HOST:PORT", got 9901'),
    # CIDR lists
    (
        ("listeners", "public", "trusted_proxies"),
        ["10.0.0.0/8", "10.0.0.0/33"],
        "listeners.public.trusted_proxies[1]: not a CIDR network: '10.0.0.0/33'",
    ),
    (
        ("pools", "chat", "allowed_networks"),
        "10.0.0.0/8",
        "pools.chat.allowed_networks: must be a list of CIDR strings, got '10.0.0.0/8'",
    ),
    (
        ("pools", "chat", "allowed_networks"),
        [10],
        "pools.chat.allowed_networks[0]: not a CIDR network: 10",
    ),
    # health path
    (
        ("pools", "chat", "health", "path"),
        "healthz",
        "pools.chat.health.path: must start with '/', got 'healthz'",
    ),
    # redis table
    (
        ("redis", "url"),
        "http://127.0.0.1:6379",
        "redis.url: must be a redis://, rediss:// or unix:// URL, got 'http://127.0.0.1:6379'",
    ),
    (("redis", "prefix"), "", "redis.prefix: must be non-empty without spaces, got ''"),
    (
        ("redis", "prefix"),
        "lb proxy",
        "redis.prefix: must be non-empty without spaces, got 'lb proxy'",
    ),
    # admin token off loopback
    (
        ("admin", "listen"),
        "0.0.0.0:9901",
        "admin.token: required when admin.listen (0.0.0.0:9901) is not a loopback address",
    ),
    (
        ("admin", "listen"),
        "[::]:9901",
        "admin.token: required when admin.listen ([::]:9901) is not a loopback address",
    ),
    # backends
    (
        ("pools", "chat", "backends"),
        [],
        "pools.chat.backends: a static pool needs at least one backend",
    ),
    (
        ("pools", "chat", "backends"),
        "b1",
        "pools.chat.backends: must be a list of tables, got 'b1'",
    ),
    (
        ("pools", "chat", "backends"),
        ["127.0.0.1:9001"],
        "pools.chat.backends[0]: must be a table, got '127.0.0.1:9001'",
    ),
    (("pools", "chat", "backends", 0, "id"), "", "pools.chat.backends[0].id: must not be empty"),
    # required keys
    (("pools", "chat", "backends"), [{"id": "b1"}], "pools.chat.backends[0].address: required"),
    (
        ("listeners", "public", "tls"),
        {"cert": "/etc/hostname"},
        "listeners.public.tls.key: required",
    ),
    # listener references a pool that does not exist
    (
        ("listeners", "public", "pool"),
        "nope",
        "listeners.public.pool: no pool named 'nope' (pools: chat)",
    ),
    # no listener at all
    (("listeners",), {}, "listeners: at least one listener is required"),
    (("listeners", "public"), 1, "listeners.public: must be a table, got 1"),
]


@pytest.mark.parametrize(("keys", "value", "line"), CASES, ids=[case[2] for case in CASES])
def test_each_rule_reports_one_exact_line(
    keys: tuple[str | int, ...], value: object, line: str
) -> None:
    assert problems_of(with_value(keys, value)) == [f"conf.toml: {line}"]


@pytest.mark.parametrize(
    "hash_key", ["ip", "cookie:lbid", "header:X-User-Id", "query:room", "cookie:a.b_c~1"]
)
def test_hash_key_accepted(hash_key: str) -> None:
    data = with_value(("pools", "chat", "hash_key"), hash_key)
    assert parse_config(data, "c").pools["chat"].hash_key == hash_key


@pytest.mark.parametrize(
    "hash_key", ["", "IP", "cookie:", "cookie", "header:X User", "path:/x", "query:a=b", "cookie:é"]
)
def test_hash_key_rejected(hash_key: str) -> None:
    expected = (
        "conf.toml: pools.chat.hash_key: must be 'ip', 'cookie:NAME', 'header:NAME' or "
        f"'query:NAME' (NAME a token), got {hash_key!r}"
    )
    assert problems_of(with_value(("pools", "chat", "hash_key"), hash_key)) == [expected]


def test_tcp_listener_cannot_hash_on_http_keys() -> None:
    data = with_value(("listeners", "public", "mode"), "tcp")
    data["pools"]["chat"].update(balance="hash", hash_key="cookie:lbid")
    assert problems_of(data) == [
        "conf.toml: listeners.public.pool: pool 'chat' hashes on 'cookie:lbid' but tcp mode only"
        ' knows the client IP (use hash_key = "ip")'
    ]
    data["pools"]["chat"]["hash_key"] = "ip"
    assert parse_config(data, "c").listeners["public"].mode == "tcp"
    data["pools"]["chat"].update(balance="round-robin", hash_key="header:X")
    assert parse_config(data, "c").pools["chat"].hash_key == "header:X"


def test_duplicate_backend_ids() -> None:
    data = with_value(
        ("pools", "chat", "backends"),
        [
            {"id": "b1", "address": "127.0.0.1:9001"},
            {"id": "b1", "address": "127.0.0.1:9002"},
            {"address": "127.0.0.1:9003"},
            {"address": "127.0.0.1:9003"},
        ],
    )
    assert problems_of(data) == [
        "conf.toml: pools.chat.backends[1].id: duplicate backend id 'b1'",
        "conf.toml: pools.chat.backends[3].id: duplicate backend id '127.0.0.1:9003'",
    ]


def test_listeners_on_the_same_address() -> None:
    data = base()
    listeners = data["listeners"]
    listeners["b"] = {"bind": "127.0.0.1:8080", "pool": "chat"}
    listeners["c"] = {"bind": "0.0.0.0:8080", "pool": "chat"}
    listeners["d"] = {"bind": "[::1]:8080", "pool": "chat"}  # other family: no clash
    listeners["e"] = {"bind": "127.0.0.1:0", "pool": "chat"}  # port 0: each gets a free port
    listeners["f"] = {"bind": "127.0.0.1:0", "pool": "chat"}
    listeners["g"] = {"bind": "127.0.0.1:9901", "pool": "chat"}  # the admin address
    assert problems_of(data) == [
        "conf.toml: listeners.b.bind: 127.0.0.1:8080 clashes with listeners.public.bind"
        " (127.0.0.1:8080)",
        "conf.toml: listeners.c.bind: 0.0.0.0:8080 clashes with listeners.public.bind"
        " (127.0.0.1:8080)",
        "conf.toml: listeners.g.bind: 127.0.0.1:9901 clashes with admin.listen (127.0.0.1:9901)",
    ]


def test_redis_discovery_needs_redis_table() -> None:
    data = with_value(("pools", "chat", "discovery"), "redis")
    assert problems_of(data) == ["conf.toml: pools.chat.discovery: 'redis' needs a [redis] table"]
    data["redis"] = {"url": "rediss://cache:6380/1"}
    assert parse_config(data, "c").redis is not None


@pytest.mark.parametrize("listen", ["127.0.0.1:9901", "127.8.9.10:1", "[::1]:9901", "localhost:1"])
def test_admin_on_loopback_needs_no_token(listen: str) -> None:
    assert parse_config(with_value(("admin", "listen"), listen), "c").admin.token == ""


def test_admin_token_given_off_loopback() -> None:
    data = with_value(("admin", "listen"), "10.0.0.5:9901")
    data["admin"]["token"] = "t"
    assert parse_config(data, "c").admin.listen == Address("10.0.0.5", 9901)


def test_quoted_table_names_in_problem_keys() -> None:
    data = base()
    data["listeners"]["my listener"] = {"bind": "127.0.0.1:1", "pool": "chat", "x": 1}
    assert problems_of(data) == ['conf.toml: listeners."my listener".x: unknown key']


# --- tls --------------------------------------------------------------------------------------


def test_tls_files_resolved_against_config_directory(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    conf = tmp_path / "lb.toml"
    conf.write_text(
        '[listeners.public]\nbind = "127.0.0.1:8443"\npool = "chat"\n'
        f'tls = {{ cert = "certs/cert.pem", key = "{tmp_path / "key.pem"}" }}\n'
        '[pools.chat]\nbackends = [{ id = "b1", address = "127.0.0.1:9001" }]\n'
    )
    tls = load_config(conf).listeners["public"].tls
    assert tls is not None
    assert (tls.cert, tls.key) == (str(tmp_path / "certs/cert.pem"), str(tmp_path / "key.pem"))


def test_tls_missing_files_and_keys(tmp_path: Path) -> None:
    data = with_value(
        ("listeners", "public", "tls"), {"cert": "nope.pem", "key": "k.pem", "ca": "x"}
    )
    assert problems_of(data, str(tmp_path / "lb.toml")) == [
        f"{tmp_path}/lb.toml: listeners.public.tls.ca: unknown key",
        f"{tmp_path}/lb.toml: listeners.public.tls.cert: no such file: '{tmp_path}/nope.pem'",
        f"{tmp_path}/lb.toml: listeners.public.tls.key: no such file: '{tmp_path}/k.pem'",
    ]
    data["listeners"]["public"]["tls"] = {}
    assert problems_of(data, "lb.toml") == [
        "lb.toml: listeners.public.tls.cert: required",
        "lb.toml: listeners.public.tls.key: required",
    ]


# --- files and several problems at once -------------------------------------------------------


def test_unreadable_and_invalid_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("missing.toml")
    assert info.value.problems == ["missing.toml: cannot read: No such file or directory"]
    Path("bad.toml").write_text('[listeners.public]\nbind = "127.0.0.1:1\n')
    with pytest.raises(ConfigError) as info:
        load_config("bad.toml")
    try:
        tomllib.loads(Path("bad.toml").read_text())
    except tomllib.TOMLDecodeError as exc:
        expected = f"bad.toml: invalid TOML: {exc}"
    assert info.value.problems == [expected]
    Path("latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config("latin1.toml")
    assert info.value.problems == [
        "latin1.toml: invalid TOML: not UTF-8 text (invalid continuation byte)"
    ]


def test_all_problems_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("conf.toml").write_text(
        """
typo = 1
[admin]
listen = "0.0.0.0:9901"

[listeners.public]
bind = "127.0.0.1"
mode = "udp"
pool = "nope"
max_connections = 0

[listeners.raw]
bind = "127.0.0.1:7000"
mode = "tcp"
pool = "chat"

[pools.chat]
balance = "hash"
hash_key = "header:X-User"
discovery = "redis"
backends = [
  { id = "b1", address = "127.0.0.1:9001", colour = "blue" },
  { id = "b1", address = "127.0.0.1", weight = 1000 },
]

[pools.chat.health]
interval = -1
path = "healthz"
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config("conf.toml")
    assert info.value.problems == [
        "conf.toml: typo: unknown key",
        "conf.toml: admin.token: required when admin.listen (0.0.0.0:9901)"
        " is not a loopback address",
        "conf.toml: listeners.public.bind: not HOST:PORT: '127.0.0.1'",
        "conf.toml: listeners.public.mode: must be one of 'http', 'tcp', got 'udp'",
        "conf.toml: listeners.public.max_connections: must be an integer >= 1, got 0",
        "conf.toml: pools.chat.backends[0].colour: unknown key",
        "conf.toml: pools.chat.backends[1].address: not HOST:PORT: '127.0.0.1'",
        "conf.toml: pools.chat.backends[1].id: duplicate backend id 'b1'",
        "conf.toml: pools.chat.backends[1].weight: must be an integer from 1 to 256, got 1000",
        "conf.toml: pools.chat.health.path: must start with '/', got 'healthz'",
        "conf.toml: pools.chat.health.interval: must be a positive number, got -1",
        "conf.toml: listeners.public.pool: no pool named 'nope' (pools: chat)",
        "conf.toml: listeners.raw.pool: pool 'chat' hashes on 'header:X-User' but tcp mode only"
        ' knows the client IP (use hash_key = "ip")',
        "conf.toml: pools.chat.discovery: 'redis' needs a [redis] table",
    ]
