"""Apply registry snapshots to pools (no I/O): the watcher reads, this decides.

Only backends whose ``source`` is "redis" are touched; static backends stay. A backend
whose registration vanished is removed (it drains its open connections). Registrations
outside the pool's ``allowed_networks`` or malformed are ignored and logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from lbproxy.pool import BackendState, Pool
from lbproxy.registry_schema import Entry, Snapshot, address_allowed

log = logging.getLogger("lbproxy.registry")

MAX_LOGGED = 10_000


class PoolFeeder:
    """Reconciles pools with registry snapshots; remembers what it applied per pool."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, Entry]] = {}  # pool -> entries last applied
        self._logged: set[tuple[str, ...]] = set()

    def keep_only(self, pools: Mapping[str, Pool]) -> None:
        """Forget what was applied to pools no longer fed."""
        for name in [n for n in self._seen if n not in pools]:
            del self._seen[name]

    def drop_redis_backends(self, pool: Pool, reason: str) -> None:
        self._seen.pop(pool.name, None)
        for backend in list(pool.backends.values()):
            if backend.source == "redis" and not backend.removed:
                pool.remove(backend.id, reason)

    def apply(self, pool: Pool, snapshot: Snapshot, received: float) -> float | None:
        """Make the pool's redis backends match ``snapshot``; return the earliest expiry
        (local monotonic time, ``received`` being when the snapshot arrived) or None."""
        for member, why in snapshot.malformed:
            self.log_once(
                ("malformed", pool.name, member, why),
                "registry: pool %s: ignoring malformed registration %r: %s",
                pool.name,
                member,
                why,
            )
        entries = {e.id: e for e in snapshot.entries if self._allowed(pool, e)}
        for backend in list(pool.backends.values()):
            if backend.source == "redis" and not backend.removed and backend.id not in entries:
                pool.remove(backend.id, "registration left or expired")
        seen = self._seen.setdefault(pool.name, {})
        for member in [m for m in seen if m not in entries]:
            del seen[member]
        for entry in entries.values():
            self._apply_entry(pool, entry, seen.get(entry.id))
            seen[entry.id] = entry
        if not entries:
            return None
        offset = snapshot.server_time - received  # server clock minus local monotonic
        return min(e.expiry for e in entries.values()) - offset

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
