"""The shared count table, the column map and the pool snapshots of `serve --workers N`
(in process: two Pool objects on one table stand for two workers)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lbproxy.config.load import parse_address
from lbproxy.config.types import BackendConfig, PoolConfig
from lbproxy.core.pool import BackendState, Pool
from lbproxy.core.shared_counts import NO_COLUMN, Columns, SharedCounts
from lbproxy.ops.pool_sync import (
    SNAPSHOT_REASON,
    apply_snapshot,
    decode,
    dump_stats,
    encode,
    merge_stats,
    snapshot_pools,
)
from lbproxy.ops.stats import Stats


class Conn:
    def go_away(self) -> None:
        pass


def pool_config(balance: str = "least-connections", factor: float = 0.0) -> PoolConfig:
    backends = tuple(
        BackendConfig(id=f"b{i}", address=parse_address(f"127.0.0.1:{9000 + i}"), weight=1)
        for i in (1, 2)
    )
    return PoolConfig(name="main", backends=backends, balance=balance, hash_balance_factor=factor)


@pytest.fixture
def table() -> Iterator[SharedCounts]:
    counts = SharedCounts.create(rows=3, columns=16)
    yield counts
    counts.close()


def workers(table: SharedCounts, config: PoolConfig) -> tuple[Pool, Pool, Pool]:
    """The supervisor's pool (assigns columns) and two workers' pools on the same table."""
    supervisor = Pool(config)
    supervisor.share(table)
    columns = Columns(table.columns)
    snap = snapshot_pools({"main": supervisor}, columns.take)
    pools = []
    for row in (0, 1):
        pool = Pool(config)
        pool.share(SharedCounts(table.fd, table.rows, table.columns, row))
        apply_snapshot({"main": pool}, snap)
        pools.append(pool)
    return supervisor, pools[0], pools[1]


def test_a_pick_in_one_worker_sees_the_other_workers_connections(table: SharedCounts) -> None:
    supervisor, first, second = workers(table, pool_config())
    b1 = first.get("b1")
    assert b1 is not None and b1.column != NO_COLUMN
    conns = [Conn() for _ in range(3)]
    for conn in conns:
        first.attach(b1, conn)  # worker 0 holds 3 connections on b1
    # worker 1 has none of its own, yet it picks b2 every time: it sees worker 0's
    assert {second.pick(None).id for _ in range(4)} == {"b2"}  # type: ignore[union-attr]
    s1 = supervisor.get("b1")
    assert s1 is not None and supervisor.active(s1) == 3 and second.active(second.get("b1")) == 3  # type: ignore[arg-type]
    first.sent_away(b1, conns[0])  # told to go away: stops counting at once
    first.detach(b1, conns[1])
    assert supervisor.active(s1) == 1 and table.row_total(0) == 1 and table.row_total(1) == 0
    table.zero_row(0)  # the worker died: what it held stops counting
    assert supervisor.active(s1) == 0


def test_bounded_load_hashing_reads_the_shared_counts(table: SharedCounts) -> None:
    _, first, second = workers(table, pool_config("hash", factor=1.25))
    home = first.pick(b"user-7")
    assert home is not None
    for _ in range(6):
        first.attach(home, Conn())  # worker 0 overloads the key's home backend
    other = second.pick(b"user-7")
    assert other is not None and other.id != home.id  # worker 1's bounded load sees it


def test_columns_are_reused_only_once_nothing_counts_there(table: SharedCounts) -> None:
    columns = Columns(4)  # slots 1..3 (0 = none)
    a, b, c = columns.take(), columns.take(), columns.take()
    assert sorted((a, b, c)) == [1, 2, 3]
    assert columns.take() == NO_COLUMN  # full
    writer = SharedCounts(table.fd, table.rows, table.columns, 0)
    writer.set(a, 2)
    columns.release_unused({b, c}, table)
    assert columns.take() == NO_COLUMN  # a's backend is gone but a worker still counts there
    writer.set(a, 0)
    columns.release_unused({b, c}, table)
    assert columns.take() == a


def test_a_removed_backend_stays_in_the_supervisors_view_while_workers_hold_it(
    table: SharedCounts,
) -> None:
    supervisor, first, _ = workers(table, pool_config())
    b1 = first.get("b1")
    assert b1 is not None
    conn = Conn()
    first.attach(b1, conn)
    supervisor.remove("b1", "gone from the registry")
    s1 = supervisor.get("b1")
    assert s1 is not None and s1.removed and s1.state is BackendState.DRAINING
    assert supervisor.active(s1) == 1
    first.detach(b1, conn)
    supervisor.forget_if_done(s1)
    assert supervisor.get("b1") is None


def test_a_worker_follows_the_snapshot_and_forwards_nothing_back(table: SharedCounts) -> None:
    supervisor, first, _ = workers(table, pool_config())
    changes: list[tuple[str, str]] = []
    first.subscribe(lambda p, b, old, new, why: changes.append((b.id, why)))
    supervisor.drain("b1")
    supervisor.upsert("b3", parse_address("127.0.0.1:9003"), 2, source="redis")
    supervisor.remove("b2", "gone")
    columns = Columns(table.columns)
    columns.take()
    columns.take()  # b1 and b2 have theirs: b3 gets a new one
    snap = snapshot_pools({"main": supervisor}, columns.take)
    apply_snapshot({"main": first}, decode(encode({"pools": snap}))["pools"])  # type: ignore[index]
    states = {b.id: (b.state, b.removed, b.weight) for b in first.backends.values()}
    assert states["b1"][0] is BackendState.DRAINING
    assert states["b3"] == (BackendState.UP, False, 2) and first.get("b3").source == "redis"  # type: ignore[union-attr]
    assert "b2" not in states  # removed (no connections: forgotten)
    assert all(why.endswith(SNAPSHOT_REASON) or why == "added" for _, why in changes), changes


def test_worker_counters_add_up() -> None:
    one, two = Stats(), Stats()
    one.connections_total["public"] += 3
    two.connections_total["public"] += 4
    two.bytes[("main", "b1", "in")] += 10
    one.handshake_seconds.observe(0.002)
    two.handshake_seconds.observe(0.002)
    merged = merge_stats([one, decode(encode(dump_stats(two))) or {}])
    assert merged.connections_total["public"] == 7
    assert merged.bytes[("main", "b1", "in")] == 10
    assert merged.handshake_seconds.count == 2 and sum(merged.handshake_seconds.counts) == 2
