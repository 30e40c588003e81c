"""Weighted consistent hashing: a hash ring with virtual nodes and an O(1) bucket index.

Each member (id, weight) puts ``POINTS_PER_UNIT`` points per unit of weight on a 64-bit
ring; point ``k`` is derived from BLAKE2b of the id and ``k`` only (never from the other
members), so it does not matter in which order members are given, and every lbproxy
instance with the same member set builds the identical ring. A key hash is owned by the
first point at or after it, wrapping around. ``table_size`` buckets over the ring
remember their first point, so ``lookup`` is one list index plus, on average, less than
one step.

Why a ring and not Maglev (the trade):

* Movement. Adding or removing one member only moves the keys that member gains or
  loses (about 1/N); no key ever moves between two other members. Maglev also moves
  ~1/N, plus a few percent between survivors, because its table is refilled.
* Bounded loads. The preference order of a key is the ring walk from its position,
  which is exactly the walk "consistent hashing with bounded loads" is defined on.
* Cost. Building is O(P log P) for P points: about 12 ms for 100 members in pure
  Python, against about 45 ms to fill a 65537-slot Maglev table, and pools rebuild on
  every health change. Lookup is O(1) expected for both.
* Evenness is the price: with 160 points per unit a member's share deviates from its
  weight by about 8% (one standard deviation); Maglev is within about 1%. Bounded loads
  (``hash_balance_factor``) caps the effect on open connections.

Weights are divided by their greatest common divisor first (all-equal weights of any
size cost 160 points each). Weights <= 0 put no points on the ring: such members own no
keys and come last (in id order) in every preference; if every weight is <= 0 they all
count as 1. Should the ring exceed ``MAX_POINTS`` (extreme weight ratios), point counts
are scaled down proportionally (at least one per member); only then do changes of the
member set also move some keys between survivors.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator, Sequence
from itertools import accumulate

POINTS_PER_UNIT = 160
MAX_POINTS = 1 << 16
_MASK64 = (1 << 64) - 1
_POINT_PERSON = b"lbproxy-ring"
_EIGHT_U64 = struct.Struct("<8Q")


def member_points(ident: str, count: int) -> list[int]:
    """The first ``count`` ring points of member ``ident`` (eight per BLAKE2b-512 block)."""
    name = ident.encode("utf-8", "surrogatepass")
    points: list[int] = []
    for block in range((count + 7) // 8):
        digest = hashlib.blake2b(
            name + block.to_bytes(4, "little"), digest_size=64, person=_POINT_PERSON
        ).digest()
        points.extend(_EIGHT_U64.unpack(digest))
    del points[count:]
    return points


def point_counts(weights: Sequence[int]) -> list[int]:
    """Ring points per member for these weights (see the module docstring)."""
    positive = [w if w > 0 else 0 for w in weights]
    if not any(positive):
        positive = [1] * len(weights)
    divisor = math.gcd(*positive)
    units = [w // divisor for w in positive]
    total = sum(units)
    if total * POINTS_PER_UNIT <= MAX_POINTS:
        return [u * POINTS_PER_UNIT for u in units]
    return [max(1, u * MAX_POINTS // total) if u else 0 for u in units]


class ConsistentHash:
    """Immutable weighted ring over ``members`` (pairs of id and weight)."""

    __slots__ = ("_ids", "_index", "_owners", "_points", "_table_size", "_unplaced", "members")

    def __init__(self, members: Sequence[tuple[str, int]], table_size: int = 65537) -> None:
        if not members:
            raise ValueError("ConsistentHash needs at least one member")
        if table_size < 1:
            raise ValueError(f"table_size must be positive, not {table_size}")
        ordered = sorted(members)
        ids = tuple(ident for ident, _ in ordered)
        if len(set(ids)) != len(ids):
            raise ValueError("ConsistentHash: duplicate member ids")
        self.members: tuple[tuple[str, int], ...] = tuple(ordered)
        self._ids = ids
        self._table_size = table_size
        counts = point_counts([weight for _, weight in ordered])
        self._unplaced = tuple(ident for ident, n in zip(ids, counts, strict=True) if n == 0)
        # Sort (point, member index) pairs packed into one int: equal points (64-bit
        # collisions) fall back to id order, which is the same in every instance.
        bits = max(1, (len(ids) - 1).bit_length())
        packed: list[int] = []
        for owner, (ident, count) in enumerate(zip(ids, counts, strict=True)):
            packed.extend((point << bits) | owner for point in member_points(ident, count))
        packed.sort()
        mask = (1 << bits) - 1
        self._points = [value >> bits for value in packed]
        self._owners = [value & mask for value in packed]
        self._index = self._build_index(self._points, table_size)

    @staticmethod
    def _build_index(points: list[int], table_size: int) -> list[int]:
        """``index[b]`` = first point in bucket ``b`` or later (``len(points)``: wrap)."""
        per_bucket = [0] * table_size
        for point in points:
            per_bucket[(point * table_size) >> 64] += 1
        index = [0]
        index.extend(accumulate(per_bucket))
        index.pop()
        return index

    def _position(self, h: int) -> int:
        """Ring index of the first point at or after ``h`` (wrapping to 0)."""
        h &= _MASK64
        points = self._points
        end = len(points)
        position = self._index[(h * self._table_size) >> 64]
        while position < end and points[position] < h:
            position += 1
        return position if position < end else 0

    def lookup(self, h: int) -> str:
        """The owner of key hash ``h`` (taken modulo 2**64)."""
        return self._ids[self._owners[self._position(h)]]

    def preference(self, h: int) -> Iterator[str]:
        """Every member once: ``lookup(h)`` first, then the ring walk onwards, then members
        with no points (weight <= 0) in id order. Lazy: taking the first few is cheap."""
        ids = self._ids
        owners = self._owners
        placed = len(ids) - len(self._unplaced)
        seen = bytearray(len(ids))
        found = 0
        start = self._position(h)
        end = len(owners)
        for offset in range(end):
            position = start + offset
            owner = owners[position if position < end else position - end]
            if not seen[owner]:
                seen[owner] = 1
                yield ids[owner]
                found += 1
                if found == placed:
                    break
        yield from self._unplaced
