"""Apply registry snapshots to pools (no I/O): the watcher reads, this decides.

Only backends whose ``source`` is "redis" are touched; static backends stay. A registration
that is deregistered (a ``leave`` event), marked draining, expired in the Redis we watch, or
made invalid acts at once. One that merely vanished (a Redis restarted empty, a flush, a
failover to an empty replica) keeps its backend as it was until its TTL passes without a
heartbeat re-registering it. Admin drains/enables are the pool's state and are kept.
Registrations at refused addresses (lbproxy's own, link-local, unspecified, multicast) or
outside ``allowed_networks`` are ignored and logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lbproxy.config.types import Address
from lbproxy.core.pool import BackendState, Pool
from lbproxy.registry.schema import NO_HASH, Entry, Snapshot, address_allowed, address_refusal

log = logging.getLogger("lbproxy.registry.register")

MAX_LOGGED = 10_000
DEFAULT_TTL = 6.0  # grace for a vanished backend whose TTL was never observed


@dataclass(slots=True)
class Track:
    """What the feeder knows of one registration (local monotonic times)."""

    ttl: float  # the longest remaining lifetime ever read: the registration's TTL, about
    vanished_until: float | None = None  # grace deadline once it vanished from a snapshot


def vanished_fate(
    track: Track, *, left: bool, invalid: bool, expired_at: float | None,
    session_start: float, now: float,
) -> tuple[str | None, float | None]:  # fmt: skip
    """Decide for a registration missing from a snapshot: (removal reason, None) to remove
    it now, or (None, deadline) to keep it as it is until ``deadline``."""
    if left:
        return "deregistered", None
    if invalid:
        return "registration invalid or refused", None
    if expired_at is not None and expired_at >= session_start:
        return "registration expired", None  # expired while we watched this Redis
    deadline = now + track.ttl if track.vanished_until is None else track.vanished_until
    if now >= deadline:
        return "registration vanished and not renewed within its TTL", None
    return None, deadline


class PoolFeeder:
    """Reconciles pools with registry snapshots; remembers what it applied per pool."""

    def __init__(self, own: Iterable[Address] = ()) -> None:
        self._seen: dict[str, dict[str, Entry]] = {}  # pool -> entries last applied
        self._tracks: dict[str, dict[str, Track]] = {}  # pool -> id -> Track
        self._leaves: dict[tuple[str, str], float] = {}  # (pool, id) -> when the leave came
        self._session_start = 0.0
        self._logged: set[tuple[str, ...]] = set()
        self.own: frozenset[Address] = frozenset(own)

    def keep_only(self, pools: Mapping[str, Pool]) -> None:
        """Forget what was applied to pools no longer fed."""
        for name in [n for n in self._seen if n not in pools]:
            del self._seen[name]
        for name in [n for n in self._tracks if n not in pools]:
            del self._tracks[name]

    def drop_redis_backends(self, pool: Pool, reason: str) -> None:
        self._seen.pop(pool.name, None)
        self._tracks.pop(pool.name, None)
        for backend in list(pool.backends.values()):
            if backend.source == "redis" and not backend.removed:
                pool.remove(backend.id, reason)

    def begin_session(self, now: float) -> None:
        """A (re)connection: expiries passed before it happened in a Redis we did not see."""
        self._session_start = now

    def note_leave(self, pool: str, backend_id: str, now: float) -> None:
        """An explicit deregistration was announced (``leave`` event)."""
        if len(self._leaves) > MAX_LOGGED:
            self._leaves.clear()
        self._leaves[(pool, backend_id)] = now

    def apply(
        self, pool: Pool, snapshot: Snapshot, received: float, sent: float | None = None
    ) -> float | None:
        """Make the pool's redis backends match ``snapshot`` (read from ``sent`` to
        ``received``, local monotonic); return when to look again (earliest expiry or grace
        deadline, local monotonic) or None."""
        self._log_malformed(pool, snapshot)
        offset = snapshot.server_time - received  # server clock minus local monotonic
        entries = {e.id: e for e in snapshot.entries if self._allowed(pool, e)}
        invalid = {e.id for e in snapshot.entries if e.id not in entries}
        invalid |= {m for m, why in snapshot.malformed if why != NO_HASH}
        expired = {m: score - offset for m, score in snapshot.expired}
        wake = self._missing(pool, entries, invalid, expired, received)
        tracks = self._tracks.setdefault(pool.name, {})
        seen = self._seen.setdefault(pool.name, {})
        for member in [m for m in tracks if pool.get(m) is None or m in invalid]:
            del tracks[member]
        for entry in entries.values():
            self._apply_entry(pool, entry, seen.get(entry.id))
            seen[entry.id] = entry
            remaining = entry.expiry - snapshot.server_time
            previous = tracks.get(entry.id)
            ttl = max(remaining, previous.ttl if previous is not None else 0.0)
            tracks[entry.id] = Track(ttl)
            wake.append(entry.expiry - offset)
        self._consume_leaves(pool.name, received if sent is None else sent)
        return min(wake, default=None)

    def _missing(
        self,
        pool: Pool,
        entries: Mapping[str, Entry],
        invalid: set[str],
        expired: Mapping[str, float],
        now: float,
    ) -> list[float]:
        """Remove or keep (grace) the redis backends missing from a snapshot; their wakes."""
        tracks = self._tracks.setdefault(pool.name, {})
        seen = self._seen.setdefault(pool.name, {})
        wake: list[float] = []
        vanished: list[str] = []
        for backend in list(pool.backends.values()):
            if backend.source != "redis" or backend.removed or backend.id in entries:
                continue
            track = tracks.get(backend.id) or Track(DEFAULT_TTL)
            reason, until = vanished_fate(
                track,
                left=(pool.name, backend.id) in self._leaves,
                invalid=backend.id in invalid,
                expired_at=expired.get(backend.id),
                session_start=self._session_start,
                now=now,
            )
            if reason is not None:
                pool.remove(backend.id, reason)
                tracks.pop(backend.id, None)
                seen.pop(backend.id, None)
            elif until is not None:
                if track.vanished_until is None:
                    vanished.append(backend.id)
                track.vanished_until = until
                tracks[backend.id] = track
                wake.append(until)
        if vanished:
            log.warning(
                "registry: pool %s: %d registration(s) vanished without a deregistration "
                "(%s); kept as they are until their TTL passes with no heartbeat",
                pool.name,
                len(vanished),
                ", ".join(sorted(vanished)[:10]) + (", ..." if len(vanished) > 10 else ""),
            )
        return wake

    def _consume_leaves(self, pool: str, sent: float) -> None:
        """Leaves heard before this read was sent are reflected in it: forget them."""
        for key in [k for k, at in self._leaves.items() if k[0] == pool and at <= sent]:
            del self._leaves[key]

    def _log_malformed(self, pool: Pool, snapshot: Snapshot) -> None:
        for member, why in snapshot.malformed:
            self.log_once(
                ("malformed", pool.name, member, why),
                "registry: pool %s: ignoring malformed registration %r: %s",
                pool.name,
                member,
                why,
            )

    def _apply_entry(self, pool: Pool, entry: Entry, previous: Entry | None) -> None:
        current = pool.get(entry.id)
        if current is not None and current.source != "redis" and not current.removed:
            self.log_once(
                ("static", pool.name, entry.id),
                "registry: pool %s: registration %s ignored, a static backend has that id",
                pool.name,
                entry.id,
            )
            return
        fresh = current is None or current.removed or current.address != entry.address
        was_draining = previous is not None and previous.draining
        pool.upsert(
            entry.id,
            entry.address,
            entry.weight,
            source="redis",
            draining=entry.draining and (fresh or not was_draining),
        )
        backend = pool.get(entry.id)
        if (
            not entry.draining
            and was_draining
            and not fresh
            and backend is not None
            and backend.state is BackendState.DRAINING
        ):
            pool.enable(entry.id, "registration up again")

    def _allowed(self, pool: Pool, entry: Entry) -> bool:
        refusal = address_refusal(entry.address, self.own)
        if refusal is not None:
            self.log_once(
                ("refused", pool.name, entry.id),
                "registry: pool %s: registration %s at %s refused: %s",
                pool.name,
                entry.id,
                entry.address,
                refusal,
            )
            return False
        networks = pool.config.allowed_networks
        if not networks:
            self.log_once(
                ("any", pool.name),
                "registry: pool %s has no allowed_networks: any registered address is accepted",
                pool.name,
            )
            return True
        if address_allowed(entry.address, networks):
            return True
        self.log_once(
            ("denied", pool.name, entry.id, str(entry.address)),
            "registry: pool %s: registration %s at %s ignored: not an IP inside allowed_networks",
            pool.name,
            entry.id,
            entry.address,
        )
        return False

    def log_once(self, key: tuple[str, ...], message: str, *args: object) -> None:
        if key not in self._logged:
            if len(self._logged) > MAX_LOGGED:
                self._logged.clear()
            self._logged.add(key)
            log.warning(message, *args)
