"""The pool: states and their transitions, membership, passive health, slow start, picking."""

from __future__ import annotations

from collections import Counter

from lbproxy.config.types import Address, BackendConfig, HealthConfig, PoolConfig
from lbproxy.core.pool import Backend, BackendState, Pool


class Conn:
    def __init__(self) -> None:
        self.gone = False

    def go_away(self) -> None:
        self.gone = True


def pool(n: int = 3, **kwargs: object) -> tuple[Pool, list[tuple[str, str, str]]]:
    backends = tuple(BackendConfig(f"b{i}", Address("127.0.0.1", 9000 + i)) for i in range(n))
    p = Pool(PoolConfig("p", backends=backends, **kwargs))  # type: ignore[arg-type]
    events: list[tuple[str, str, str]] = []

    def observe(_p: Pool, b: Backend, old: object, new: object, reason: str) -> None:
        events.append((b.id, getattr(old, "value", "-"), getattr(new, "value", "-")))

    p.subscribe(observe)
    return p, events


def test_state_transitions_are_reported_once() -> None:
    p, events = pool()
    assert p.mark_down("b0", "x") and not p.mark_down("b0", "again")
    assert p.pick(None, ()) is not None and p.pick(None, ()).id != "b0"  # type: ignore[union-attr]
    assert not p.mark_up("b1", "already up")
    assert p.mark_up("b0", "back")
    assert p.drain("b1") and not p.drain("b1")
    assert not p.mark_down("b1", "health never changes a draining backend")
    assert not p.mark_up("b1", "nor brings it back")
    assert p.enable("b1")
    assert events == [
        ("b0", "up", "down"),
        ("b0", "down", "up"),
        ("b1", "up", "draining"),
        ("b1", "draining", "up"),
    ]


def test_only_up_backends_are_picked() -> None:
    p, _ = pool()
    p.mark_down("b0", "x")
    p.drain("b1")
    assert {p.pick(None).id for _ in range(20)} == {"b2"}  # type: ignore[union-attr]
    p.mark_down("b2", "x")
    assert p.pick(None) is None and not p.has_up()


def test_removed_backend_drains_until_its_last_connection_closes() -> None:
    p, events = pool()
    b0 = p.backends["b0"]
    conn = Conn()
    p.attach(b0, conn)
    p.remove("b0", "gone from registry")
    assert b0.state is BackendState.DRAINING and "b0" in p.backends
    assert p.pick(None, ()).id != "b0"  # type: ignore[union-attr]
    assert not p.enable("b0")  # a removed backend cannot come back under the same object
    p.detach(b0, conn)
    assert "b0" not in p.backends and b0.active == 0
    assert events[-1] == ("b0", "draining", "-")
    p.remove("b1", "idle")  # no connections: gone at once
    assert "b1" not in p.backends


def test_upsert_updates_weight_and_replaces_on_address_change() -> None:
    p, _ = pool(1)
    old = p.backends["b0"]
    conn = Conn()
    p.attach(old, conn)
    same = p.upsert("b0", old.address, 5, source="static")
    assert same is old and old.weight == 5
    new = p.upsert("b0", Address("127.0.0.1", 9999), 1, source="redis")
    assert new is not old and p.backends["b0"] is new
    assert old.state is BackendState.DRAINING and old.removed  # the old instance drains
    p.detach(old, conn)
    assert p.backends["b0"] is new  # and does not take the new one with it
    drained = p.upsert("b0", new.address, 1, source="redis", draining=True)
    assert drained.state is BackendState.DRAINING


def test_apply_config_removes_and_adds_static_backends() -> None:
    p, _ = pool(2)
    p.upsert("r", Address("127.0.0.1", 7000), 1, source="redis")
    cfg = PoolConfig("p", backends=(BackendConfig("b1", Address("127.0.0.1", 9001)),
                                    BackendConfig("new", Address("127.0.0.1", 9100))))  # fmt: skip
    p.apply_config(cfg)
    assert set(p.backends) == {"b1", "new", "r"}  # registry backends are not the config's


def test_passive_failures_mark_down_at_the_limit() -> None:
    p, _ = pool(2, health=HealthConfig(passive_failures=3))
    b0 = p.backends["b0"]
    p.connect_failed(b0, "refused")
    p.connect_failed(b0, "refused")
    p.connect_succeeded(b0)  # resets the streak
    p.connect_failed(b0, "refused")
    p.connect_failed(b0, "refused")
    assert b0.state is BackendState.UP
    p.connect_failed(b0, "refused")
    assert b0.state is BackendState.DOWN


def test_passive_failures_zero_is_off() -> None:
    p, _ = pool(2, health=HealthConfig(passive_failures=0))
    for _ in range(10):
        p.connect_failed(p.backends["b0"], "refused")
    assert p.backends["b0"].state is BackendState.UP


def test_least_connections_with_slow_start_ramps_a_returning_backend() -> None:
    now = [100.0]
    backends = tuple(BackendConfig(f"b{i}", Address("127.0.0.1", 9000 + i)) for i in range(2))
    p = Pool(PoolConfig("p", backends=backends, slow_start=10.0), clock=lambda: now[0])
    now[0] = 200.0  # both long up
    p.mark_down("b1", "x")
    for _ in range(20):
        p.attach(p.backends["b0"], Conn())
    p.mark_up("b1", "back")  # up_since = 200
    picks = Counter()
    for _ in range(10):
        chosen = p.pick(None)
        assert chosen is not None
        picks[chosen.id] += 1
        p.attach(chosen, Conn())
    # plain least-connections would give all 10 to b1; at ~5% weight it gets a few
    assert 0 < picks["b1"] < 10
    now[0] = 211.0  # ramp over: full weight, b1 catches up
    assert p.pick(None).id == "b1"  # type: ignore[union-attr]


def test_hash_pick_is_stable_and_respects_exclude_and_bounds() -> None:
    p, _ = pool(3, balance="hash", hash_balance_factor=0)
    owner = p.pick(b"user-1")
    assert owner is not None
    assert all(p.pick(b"user-1") is owner for _ in range(5))
    other = p.pick(b"user-1", {owner.id})
    assert other is not None and other is not owner
    bounded, _ = pool(3, balance="hash", hash_balance_factor=1.25)
    for n in range(1, 31):  # one hot key: bounded loads spill it over, never above the cap
        chosen = bounded.pick(b"hot")
        assert chosen is not None
        bounded.attach(chosen, Conn())
        assert max(b.active for b in bounded.backends.values()) <= -(-1.25 * n // 3)
    loads = sorted(b.active for b in bounded.backends.values())
    assert loads[0] > 0 and sum(loads) == 30
