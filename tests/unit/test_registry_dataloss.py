"""Registry decisions in memory: a vanished registration waits out its TTL, explicit
deregistration and expiry act at once, refused addresses, drained tunnels leave `active`,
one weight range (docs/registry.md)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from lbproxy.cli import main
from lbproxy.config.load import parse_config
from lbproxy.config.types import MAX_WEIGHT, Address, HealthConfig, PoolConfig
from lbproxy.core.pool import BackendState, Pool
from lbproxy.errors import ConfigError
from lbproxy.ops.drain import Drainer
from lbproxy.registry.apply import PoolFeeder, Track, vanished_fate
from lbproxy.registry.register import Registration
from lbproxy.registry.schema import (
    NO_HASH,
    Entry,
    Snapshot,
    address_refusal,
    parse_address,
    parse_snapshot,
    parse_weight,
)

REPO = Path(__file__).resolve().parents[2]
SERVER = 1_000_000.0  # the Redis server's clock at local monotonic time 0 in these tests


def pool(allowed: tuple[str, ...] = ()) -> Pool:
    config = PoolConfig(
        "chat",
        discovery="redis",
        allowed_networks=tuple(ipaddress.ip_network(n) for n in allowed),
        health=HealthConfig(check="none"),
    )
    return Pool(config, clock=lambda: 0.0)


def entry(backend_id: str, port: int, expires: float, draining: bool = False) -> Entry:
    """A registration expiring at local time ``expires``."""
    return Entry(backend_id, Address("127.0.0.1", port), 1, draining, SERVER + expires)


def snap(at: float, *entries: Entry, expired: tuple[tuple[str, float], ...] = ()) -> Snapshot:
    """A snapshot read at local time ``at``; ``expired`` scores given in local time."""
    gone = tuple((m, SERVER + t) for m, t in expired)
    return Snapshot(SERVER + at, entries, (), gone)


def ups(p: Pool) -> dict[str, str]:
    return {b.id: b.state.value for b in p.backends.values() if not b.removed}


# -- a vanished registration ------------------------------------------------------------


def test_vanished_fate_rules() -> None:
    track = Track(ttl=3.0)

    def fate(
        left: bool = False, invalid: bool = False, expired_at: float | None = None,
        session_start: float = 0.0, now: float = 10.0,
    ) -> tuple[str | None, float | None]:  # fmt: skip
        return vanished_fate(
            track, left=left, invalid=invalid, expired_at=expired_at,
            session_start=session_start, now=now,
        )  # fmt: skip

    assert fate(left=True) == ("deregistered", None)
    assert fate(invalid=True) == ("registration invalid or refused", None)
    assert fate(expired_at=9.0) == ("registration expired", None)
    # expired before this session began (Redis was out of reach): only a grace
    assert fate(expired_at=9.0, session_start=9.5) == (None, 13.0)
    assert fate() == (None, 13.0)  # vanished: now + TTL
    track.vanished_until = 13.0
    assert fate(now=12.9) == (None, 13.0)
    assert fate(now=13.0) == ("registration vanished and not renewed within its TTL", None)


def test_empty_snapshot_keeps_backends_and_admin_state_until_ttl() -> None:
    p, feeder = pool(), PoolFeeder()
    feeder.begin_session(0.0)
    assert feeder.apply(p, snap(0.0, entry("a", 1, 3.0), entry("b", 2, 2.5)), 0.0) == 2.5
    assert p.drain("b", "drained by admin")
    # Redis restarted empty / FLUSHALL: nothing removed, nothing drained
    wake = feeder.apply(p, snap(1.0), 1.0)
    assert ups(p) == {"a": "up", "b": "draining"}
    assert wake == pytest.approx(1.0 + 2.5)  # the grace: now + each one's TTL (3.0, 2.5)
    assert feeder.apply(p, snap(2.0), 2.0) == pytest.approx(3.5)  # not extended by re-reads
    # the heartbeat re-registers: the admin drain is lbproxy's and stays
    feeder.apply(p, snap(2.5, entry("b", 2, 5.5)), 2.5)
    assert ups(p) == {"a": "up", "b": "draining"}
    # a's heartbeats really stopped: it leaves when the grace has passed
    feeder.apply(p, snap(3.9, entry("b", 2, 5.5)), 3.9)
    assert "a" in ups(p)
    feeder.apply(p, snap(4.0, entry("b", 2, 5.5)), 4.0)
    assert ups(p) == {"b": "draining"}


def test_explicit_leave_acts_at_once_and_is_told_from_a_vanished_key() -> None:
    p, feeder = pool(), PoolFeeder()
    feeder.begin_session(0.0)
    feeder.apply(p, snap(0.0, entry("a", 1, 6.0), entry("b", 2, 6.0)), 0.0)
    feeder.note_leave("chat", "a", 1.0)
    feeder.apply(p, snap(1.1), 1.1, sent=1.05)  # both gone; only a said so
    assert ups(p) == {"b": "up"}
    # a leave heard while a read was in flight (the read still shows it) is not lost
    feeder.apply(p, snap(2.0, entry("b", 2, 8.0)), 2.0)
    feeder.note_leave("chat", "b", 2.2)
    feeder.apply(p, snap(2.3, entry("b", 2, 8.0)), 2.3, sent=2.1)
    assert ups(p) == {"b": "up"}
    feeder.apply(p, snap(2.4), 2.4, sent=2.35)
    assert ups(p) == {}


def test_leave_then_rejoin_is_not_removed_later() -> None:
    p, feeder = pool(), PoolFeeder()
    feeder.begin_session(0.0)
    feeder.apply(p, snap(0.0, entry("a", 1, 6.0)), 0.0)
    feeder.note_leave("chat", "a", 1.0)
    feeder.apply(p, snap(1.2, entry("a", 1, 7.0)), 1.2, sent=1.1)  # restarted, same id
    feeder.apply(p, snap(1.5), 1.5, sent=1.4)  # then vanished (flush): a grace, not a leave
    assert ups(p) == {"a": "up"}


def test_expiry_seen_in_redis_acts_at_once_unless_it_passed_during_an_outage() -> None:
    p, feeder = pool(), PoolFeeder()
    feeder.begin_session(0.0)
    feeder.apply(p, snap(0.0, entry("a", 1, 2.0), entry("b", 2, 2.0)), 0.0)
    feeder.apply(p, snap(2.02, entry("b", 2, 4.0), expired=(("a", 2.0),)), 2.02)
    assert ups(p) == {"b": "up"}
    feeder.begin_session(9.0)  # reconnected after an outage; b expired meanwhile
    feeder.apply(p, snap(9.0, expired=(("b", 4.0),)), 9.0)
    assert ups(p) == {"b": "up"}  # its heartbeats get TTL to reach this Redis


def test_invalid_registration_is_removed_at_once_missing_hash_waits() -> None:
    p, feeder = pool(), PoolFeeder()
    feeder.begin_session(0.0)
    feeder.apply(p, snap(0.0, entry("a", 1, 6.0), entry("b", 2, 6.0)), 0.0)
    bad = Snapshot(SERVER + 1, (), (("a", "bad weight '0'"), ("b", NO_HASH)))
    feeder.apply(p, bad, 1.0)
    assert ups(p) == {"b": "up"}


def test_draining_registration_still_acts_at_once() -> None:
    p, feeder = pool(), PoolFeeder()
    feeder.begin_session(0.0)
    feeder.apply(p, snap(0.0, entry("a", 1, 6.0)), 0.0)
    feeder.apply(p, snap(0.5, entry("a", 1, 6.0, draining=True)), 0.5)
    assert ups(p) == {"a": "draining"}


def test_snapshot_reply_with_expired_members() -> None:
    reply = ["100", "5", ["old", "99.5"], "good", "106.5", ["address", "10.0.0.1:80"]]
    snapshot = parse_snapshot(reply)
    assert snapshot.expired == (("old", 99.5),)
    assert [e.id for e in snapshot.entries] == ["good"]


# -- refused addresses -------------------------------------------------------------------

OWN = (Address("127.0.0.1", 8080), Address("127.0.0.1", 9901), Address("0.0.0.0", 7000))


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:9901",  # the admin API
        "127.0.0.1:8080",  # the listener itself (a loop)
        "localhost:9901",
        "[::ffff:127.0.0.1]:9901",
        "127.0.0.1:7000",  # 0.0.0.0:7000 bind: loopback reaches it
        "127.9.9.9:7000",
        "[::1]:7000",
        "0.0.0.0:7000",
        "0.0.0.0:80",  # unspecified
        "[::]:80",
        "169.254.169.254:80",  # link-local (cloud metadata)
        "[fe80::1]:80",
        "[::ffff:169.254.1.1]:80",
        "224.0.0.1:80",  # multicast
        "[ff02::1]:80",
    ],
)
def test_refused_addresses(text: str) -> None:
    assert address_refusal(parse_address(text), OWN) is not None


@pytest.mark.parametrize(
    "text", ["127.0.0.1:9001", "127.0.0.2:8080", "10.0.0.1:9901", "[::1]:9901", "example.org:80"]
)
def test_accepted_addresses(text: str) -> None:
    assert address_refusal(parse_address(text), OWN) is None


def test_wildcard_v6_bind_and_localhost_bind() -> None:
    own = (Address("::", 443), Address("localhost", 9901))
    for text in ("127.0.0.1:443", "[::1]:443", "localhost:443", "127.0.0.1:9901", "[::1]:9901"):
        assert address_refusal(parse_address(text), own), text
    assert address_refusal(parse_address("10.1.1.1:443"), own) is None


def test_refusal_beats_allowed_networks_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="lbproxy.registry.register")
    p = pool(allowed=("0.0.0.0/0", "::/0"))
    feeder = PoolFeeder(own=[Address("127.0.0.1", 9901)])
    feeder.begin_session(0.0)
    bad = [
        Entry("admin", Address("127.0.0.1", 9901), 1, False, SERVER + 60),
        Entry("meta", Address("169.254.169.254", 80), 1, False, SERVER + 60),
        Entry("any6", Address("::", 80), 1, False, SERVER + 60),
        Entry("any4", Address("0.0.0.0", 9001), 1, False, SERVER + 60),
    ]
    good = entry("ok", 9001, 60.0)
    for at in (0.0, 1.0, 2.0):
        feeder.apply(p, Snapshot(SERVER + at, (*bad, good), ()), at)
    assert ups(p) == {"ok": "up"}
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert sorted(m.split()[4] for m in refused) == ["admin", "any4", "any6", "meta"]
    # an address that becomes refused (a new own address) leaves at once
    feeder.own = frozenset({Address("127.0.0.1", 9901), Address("127.0.0.1", 9001)})
    feeder.apply(p, Snapshot(SERVER + 3, (*bad, good), ()), 3.0)
    assert ups(p) == {}


# -- drained tunnels stop counting as active ---------------------------------------------


class Conn:
    def __init__(self) -> None:
        self.told = 0

    def go_away(self) -> None:
        self.told += 1


def test_sent_away_connections_leave_active_once() -> None:
    p = pool()
    a = p.upsert("a", Address("127.0.0.1", 1), 1, source="redis")
    b = p.upsert("b", Address("127.0.0.1", 2), 1, source="redis")
    c1, c2, c3 = Conn(), Conn(), Conn()
    p.attach(a, c1)
    p.attach(a, c2)
    p.attach(b, c3)
    p.sent_away(a, c1)
    p.sent_away(a, c1)  # twice: counted once
    p.sent_away(b, Conn())  # not attached: ignored
    assert (a.active, b.active, len(a.connections)) == (1, 1, 2)
    p.detach(a, c1)  # it finally closed: no second decrement
    assert a.active == 1 and len(a.connections) == 1
    p.sent_away(a, c2)
    assert a.active == 0 and p.pick(None) is a  # least-connections sees the real load
    p.detach(a, c2)
    assert a.active == 0


async def test_drainer_discounts_what_it_sent_away() -> None:
    config = PoolConfig(
        "chat", drain_timeout=0.0, close_spread=0.0, health=HealthConfig(check="none")
    )
    p = Pool(config)
    drainer = Drainer()
    drainer.watch(p)
    a = p.upsert("a", Address("127.0.0.1", 1), 1, source="static")
    conns = [Conn(), Conn()]
    for conn in conns:
        p.attach(a, conn)
    p.drain("a")
    for _ in range(100):
        if a.active == 0:
            break
        await asyncio.sleep(0.01)
    assert [c.told for c in conns] == [1, 1] and a.active == 0 and len(a.connections) == 2
    assert a.state is BackendState.DRAINING
    await drainer.stop()


# -- one weight range everywhere ----------------------------------------------------------


def test_weight_range_is_the_same_everywhere() -> None:
    assert MAX_WEIGHT == 256
    assert parse_weight("256") == 256
    with pytest.raises(ValueError, match="1-256"):
        parse_weight("257")
    with pytest.raises(ValueError, match="1-256"):
        Registration("redis://127.0.0.1:1/0", "p", "chat", "b1", "127.0.0.1:1", weight=257)
    data = {
        "listeners": {"public": {"bind": "127.0.0.1:8080", "pool": "chat"}},
        "pools": {"chat": {"backends": [{"id": "b1", "address": "127.0.0.1:1", "weight": 257}]}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, "c.toml")
    assert info.value.problems == [
        "c.toml: pools.chat.backends[0].weight: must be an integer from 1 to 256, got 257"
    ]
    data["pools"]["chat"]["backends"][0]["weight"] = 256
    assert parse_config(data, "c.toml").pools["chat"].backends[0].weight == 256
    args = ["register", "--redis", "redis://127.0.0.1:1/0", "--pool", "chat"]
    args += ["--address", "127.0.0.1:1", "--weight", "257"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "1<=x<=256" in result.output
    docs = (REPO / "docs" / "registry.md").read_text()
    assert "integer 1-256" in docs and "1-1000" not in docs


def test_redis_start_timeout_config() -> None:
    base = {
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "listeners": {"public": {"bind": "127.0.0.1:8080", "pool": "chat"}},
        "pools": {"chat": {"discovery": "redis"}},
    }
    config = parse_config(base, "c.toml")
    assert config.redis is not None and config.redis.start_timeout == 5.0
    base["redis"]["start_timeout"] = -1  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        parse_config(base, "c.toml")
    assert info.value.problems == [
        "c.toml: redis.start_timeout: must be a non-negative number, got -1"
    ]
