"""What the supervisor of `serve --workers N` tells its workers, and what they tell it.

Pure functions over values: the pool snapshot (every backend with its state and its column
of the shared count table) built by the supervisor and applied by each worker, the
counters a worker reports (and the supervisor sums), and the newline-delimited JSON
framing of the control socket between them. A snapshot is complete, so a worker that
missed one catches up with the next; its version only grows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lbproxy.config.load import parse_address
from lbproxy.core.pool import BackendState, Pool
from lbproxy.core.shared_counts import NO_COLUMN
from lbproxy.ops.stats import Histogram, Stats

Entry = tuple[str, str, int, str, str, int]  # id, address, weight, source, state, column
SNAPSHOT_REASON = "by the supervisor"
COUNTERS = (
    "connections_total",
    "rejected",
    "bytes",
    "upstream_errors",
    "requests",
    "ws_messages",
    "ws_closes",
    "rebalance_closes",
)
HISTOGRAMS = ("handshake_seconds", "health_check_seconds")


def snapshot_pools(pools: Mapping[str, Pool], take: Callable[[], int]) -> dict[str, list[Entry]]:
    """Every backend of every pool; a backend without a column gets one from ``take``."""
    out: dict[str, list[Entry]] = {}
    for name, pool in sorted(pools.items()):
        entries: list[Entry] = []
        for backend_id, b in sorted(pool.backends.items()):
            if b.removed:
                continue  # the workers drain it; the supervisor keeps it while they hold it
            if b.column == NO_COLUMN:
                b.column = take()
            entries.append(
                (backend_id, str(b.address), b.weight, b.source, b.state.value, b.column)
            )
        out[name] = entries
    return out


def apply_snapshot(pools: Mapping[str, Pool], snapshot: Mapping[str, Iterable[Entry]]) -> None:
    """A worker takes the supervisor's membership, states and columns."""
    for name, entries in snapshot.items():
        pool = pools.get(name)
        if pool is None:
            continue  # a pool this worker's configuration does not have yet (reload follows)
        seen: set[str] = set()
        for backend_id, address, weight, source, state, column in entries:
            seen.add(backend_id)
            addr = parse_address(address)
            current = pool.get(backend_id)
            if current is None or current.removed or current.address != addr:
                current = pool.upsert(backend_id, addr, weight, source=source)
            elif current.weight != weight:
                current = pool.upsert(backend_id, addr, weight, source=current.source)
            pool.set_column(current, column)
            wanted = BackendState(state)
            if current.state is not wanted:
                pool.assume(current, wanted, f"{wanted.value} {SNAPSHOT_REASON}")
        for backend_id, backend in list(pool.backends.items()):
            if backend_id not in seen and not backend.removed:
                pool.remove(backend_id, f"removed {SNAPSHOT_REASON}")


# -- counters ----------------------------------------------------------------------
def dump_stats(stats: Stats) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for field in (*COUNTERS, "health_checks"):
        values: Mapping[Any, int] = getattr(stats, field)
        doc[field] = [[[*k] if isinstance(k, tuple) else [k], v] for k, v in values.items()]
    for field in HISTOGRAMS:
        hist: Histogram = getattr(stats, field)
        doc[field] = [hist.counts, hist.total, hist.count]
    return doc


def add_stats(into: Stats, doc: Mapping[str, Any]) -> None:
    """Add a worker's dumped counters to ``into``."""
    for field in (*COUNTERS, "health_checks"):
        target = getattr(into, field)
        for key, value in doc.get(field, ()):
            target[key[0] if len(key) == 1 else tuple(key)] += int(value)
    for field in HISTOGRAMS:
        counts, total, count = doc.get(field, ([], 0.0, 0))
        hist: Histogram = getattr(into, field)
        if len(counts) == len(hist.counts):
            hist.counts = [a + int(b) for a, b in zip(hist.counts, counts, strict=True)]
            hist.total += float(total)
            hist.count += int(count)


def merge_stats(parts: Iterable[Stats | Mapping[str, Any]]) -> Stats:
    """One Stats holding the sum of ``parts`` (Stats objects or dumped documents)."""
    merged = Stats()
    for part in parts:
        add_stats(merged, dump_stats(part) if isinstance(part, Stats) else part)
    return merged


def add_counts(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for key, value in counts.items():
        into[key] = into.get(key, 0) + int(value)


# -- framing -----------------------------------------------------------------------
def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any] | None:
    """One message; None for a line that is not a JSON object (logged by the caller)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
