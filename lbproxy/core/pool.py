"""Backends and their state: the one source of truth the balancer reads.

Health checks, the Redis watcher, reloads and the admin API change a pool only through the
named methods here (upsert/remove/mark_up/mark_down/drain/enable and the passive-failure
hooks). Every state change is reported once to the pool's observers with its reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from lbproxy.config.types import Address, PoolConfig
from lbproxy.core.balance import (
    AffinityTable,
    ConsistentHash,
    CookieSigner,
    SmoothRoundRobin,
    Stick,
    bounded_choice,
    cookie_secret,
    key_hash,
    least_connections,
    new_sticky_value,
)
from lbproxy.core.pool_types import Backend, BackendState, Closable
from lbproxy.core.shared_counts import NO_COLUMN, SharedCounts

__all__ = ["Backend", "BackendState", "Closable", "Pool", "StateObserver"]

log = logging.getLogger("lbproxy.core.pool")

StateObserver = Callable[["Pool", Backend, BackendState | None, BackendState | None, str], None]
"""(pool, backend, old_state, new_state, reason); None for 'not in the pool'."""


class Pool:
    """A named set of backends plus the balancing policy of its config."""

    def __init__(self, config: PoolConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = config.name
        self.config = config
        self.backends: dict[str, Backend] = {}
        self._clock = clock
        self.counts: SharedCounts | None = None  # --workers N: the balancer-wide counts
        self._observers: list[StateObserver] = []
        self._round_robin = SmoothRoundRobin()
        self._up: list[Backend] = []
        self._up_ids: list[str] = []
        self._up_weights: list[int] = []
        self._hash: ConsistentHash | None = None
        self._lc_start = 0
        self._signer = CookieSigner(cookie_secret(config.sticky_secret, config.name))
        self._affinity = AffinityTable(config.affinity_linger)
        self._sticks: dict[Closable, tuple[bytes, Stick]] = {}  # connection -> its key's Stick
        self.remote: dict[str, int] | None = None  # scope "cluster": the other instances' counts
        self.tunnels: dict[Closable, tuple[Backend, bytes | None]] = {}  # rebalancing: oldest 1st
        for backend in config.backends:
            self.upsert(backend.id, backend.address, backend.weight, source="static")
        for initial in self.backends.values():
            initial.up_since = float("-inf")  # no slow start for the backends we start with

    # -- observers ---------------------------------------------------------
    def subscribe(self, observer: StateObserver) -> None:
        self._observers.append(observer)

    def _notify(
        self, backend: Backend, old: BackendState | None, new: BackendState | None, why: str
    ) -> None:
        for observer in self._observers:
            observer(self, backend, old, new, why)

    def _set_state(self, backend: Backend, state: BackendState, reason: str) -> bool:
        old = backend.state
        if old is state:
            return False
        backend.state = state
        if state is BackendState.UP:
            backend.up_since = self._clock()
            backend.failures = 0
        self._rebuild()
        log.warning(
            "pool %s backend %s (%s): %s -> %s (%s)",
            self.name,
            backend.id,
            backend.address,
            old.value,
            state.value,
            reason,
        )
        self._notify(backend, old, state, reason)
        return True

    def _rebuild(self) -> None:
        up = sorted(
            (b for b in self.backends.values() if b.state is BackendState.UP), key=lambda b: b.id
        )
        members = [(b.id, b.weight) for b in up]
        old_members = [(b.id, b.weight) for b in self._up]
        self._up = up
        self._up_ids = [b.id for b in up]
        self._up_weights = [b.weight for b in up]
        if self.config.balance == "hash" and (self._hash is None or members != old_members):
            self._hash = ConsistentHash(members) if members else None

    # -- membership --------------------------------------------------------
    def apply_config(self, config: PoolConfig) -> None:
        """Reload: take new settings, reconcile the static backends."""
        self.config = config
        self._hash = None
        self._signer = CookieSigner(cookie_secret(config.sticky_secret, config.name))
        self._affinity.linger = config.affinity_linger
        wanted = {b.id: b for b in config.backends}
        for backend in list(self.backends.values()):
            if backend.source == "static" and backend.id not in wanted:
                self.remove(backend.id, "removed from configuration")
        for b in config.backends:
            self.upsert(b.id, b.address, b.weight, source="static")
        self._rebuild()

    def upsert(
        self,
        id: str,
        address: Address,
        weight: int,
        *,
        source: str,
        draining: bool = False,
    ) -> Backend:
        """Add a backend (state up) or update its address/weight. ``draining`` marks it draining."""
        backend = self.backends.get(id)
        if backend is None or backend.removed or backend.address != address:
            if backend is not None:
                # Same id, new address: the old instance drains, the new one takes the id.
                self._retire(backend, "address changed")
            backend = Backend(id, address, weight, source)
            backend.up_since = self._clock()
            self.backends[id] = backend
            log.info("pool %s backend %s (%s) added", self.name, id, address)
            self._rebuild()
            self._notify(backend, None, backend.state, "added")
        elif backend.weight != weight:
            backend.weight = weight
            self._rebuild()
        if draining:
            self._set_state(backend, BackendState.DRAINING, "marked draining by its registration")
        return backend

    def remove(self, id: str, reason: str) -> None:
        """Remove a backend: no new connections; open ones drain (see Drainer)."""
        backend = self.backends.get(id)
        if backend is not None:
            self._retire(backend, reason)

    def _retire(self, backend: Backend, reason: str) -> None:
        backend.removed = True
        if backend.state is not BackendState.DRAINING:
            self._set_state(backend, BackendState.DRAINING, reason)
        if self.backends.get(backend.id) is backend and not self._holds(backend):
            del self.backends[backend.id]
            self._notify(backend, backend.state, None, reason)

    def forget_if_done(self, backend: Backend) -> None:
        """Drop a removed backend once its last connection closed."""
        if (
            backend.removed
            and not self._holds(backend)
            and self.backends.get(backend.id) is backend
        ):
            del self.backends[backend.id]
            self._notify(backend, backend.state, None, "drained and removed")

    # -- state changes -----------------------------------------------------
    def get(self, id: str) -> Backend | None:
        return self.backends.get(id)

    def mark_up(self, id: str, reason: str) -> bool:
        backend = self.backends.get(id)
        if backend is None or backend.state is not BackendState.DOWN:
            return False
        return self._set_state(backend, BackendState.UP, reason)

    def mark_down(self, id: str, reason: str) -> bool:
        backend = self.backends.get(id)
        if backend is None or backend.state is not BackendState.UP:
            return False
        return self._set_state(backend, BackendState.DOWN, reason)

    def drain(self, id: str, reason: str = "drained by admin") -> bool:
        backend = self.backends.get(id)
        if backend is None:
            return False
        return self._set_state(backend, BackendState.DRAINING, reason)

    def enable(self, id: str, reason: str = "enabled by admin") -> bool:
        backend = self.backends.get(id)
        if backend is None or backend.removed:
            return False
        return self._set_state(backend, BackendState.UP, reason)

    def assume(self, backend: Backend, state: BackendState, reason: str) -> bool:
        """Take a state decided elsewhere (a worker following its supervisor's snapshot)."""
        if self.backends.get(backend.id) is not backend:
            return False
        return self._set_state(backend, state, reason)

    # -- passive health ----------------------------------------------------
    def connect_failed(self, backend: Backend, reason: str) -> None:
        backend.failures += 1
        limit = self.config.health.passive_failures
        if limit > 0 and backend.failures >= limit and backend.state is BackendState.UP:
            self._set_state(
                backend, BackendState.DOWN, f"{backend.failures} failed connects: {reason}"
            )

    def connect_succeeded(self, backend: Backend) -> None:
        backend.failures = 0

    # -- connections -------------------------------------------------------
    def share(self, counts: SharedCounts | None) -> None:
        """Count in (and pick from) the balancer-wide table of ``serve --workers N``."""
        self.counts = counts

    def active(self, backend: Backend) -> int:
        """Open connections of ``backend`` in the whole balancer (every worker)."""
        counts = self.counts
        if counts is None or backend.column == NO_COLUMN:
            return backend.active
        return counts.total(backend.column)

    def set_column(self, backend: Backend, column: int) -> None:
        """The supervisor assigned ``backend`` a column: publish this worker's count there."""
        if backend.column != column:
            if self.counts is not None and backend.column != NO_COLUMN:
                self.counts.set(backend.column, 0)
            backend.column = column
        self._publish(backend)

    def _holds(self, backend: Backend) -> bool:
        """Connections still open on ``backend``: this process's, or (the supervisor of
        ``--workers N``, which holds none itself) any worker's."""
        if backend.connections:
            return True
        counts = self.counts
        return counts is not None and counts.row < 0 and self.active(backend) > 0

    def _publish(self, backend: Backend) -> None:
        if self.counts is not None:
            self.counts.set(backend.column, backend.active)

    def attach(self, backend: Backend, conn: Closable, key: bytes | None = None) -> None:
        """``conn`` opened on ``backend``; with its affinity ``key``, the key stays there."""
        backend.active += 1
        backend.connections.add(conn)
        if self.counts is not None:
            self.counts.set(backend.column, backend.active)
        if self.config.rebalance.max_imbalance > 0 and getattr(conn, "ws", False):
            self.tunnels[conn] = (backend, key)
        if key is None or self.config.balance != "hash":
            return
        signed = self._signer.read(key)
        if signed is not None:  # lbproxy's cookie: remembered only away from its backend
            if signed[1] == backend.id:
                return
            key = signed[0]
        stick = self._affinity.opened(key, backend.id, self._clock())
        self._sticks[conn] = (key, stick)

    def sent_away(self, backend: Backend, conn: Closable) -> None:
        """``conn`` was asked to go away (1001 sent or due): it stops counting as active
        for picks, bounded loads, the admin view and metrics while it finishes closing."""
        if conn in backend.connections and conn not in backend.leaving:
            backend.leaving.add(conn)
            backend.active -= 1
            self._publish(backend)

    def affinity_key(self, conn: Closable) -> bytes | None:
        """The affinity key ``conn`` was attached with (it moves with it on an upgrade)."""
        stuck = self._sticks.get(conn)
        return None if stuck is None else stuck[0]

    def detach(self, backend: Backend, conn: Closable) -> None:
        if conn in backend.connections:
            backend.connections.discard(conn)
            if conn in backend.leaving:
                backend.leaving.discard(conn)
            else:
                backend.active -= 1
                self._publish(backend)
            if self.tunnels:
                self.tunnels.pop(conn, None)
            stuck = self._sticks.pop(conn, None)
            if stuck is not None:
                self._affinity.closed(stuck[0], stuck[1], self._clock())
            if backend.removed:
                self.forget_if_done(backend)

    # -- selection ---------------------------------------------------------
    def load(self, backend: Backend) -> int:
        """Open connections of ``backend`` as picks see them (the cluster's, scope "cluster")."""
        remote = self.remote
        return self.active(backend) + (remote.get(backend.id, 0) if remote else 0)

    def has_up(self) -> bool:
        return bool(self._up)

    def effective_weight(self, backend: Backend, now: float) -> float:
        ramp = self.config.slow_start
        if ramp <= 0:
            return float(backend.weight)
        elapsed = now - backend.up_since
        if elapsed >= ramp:
            return float(backend.weight)
        return backend.weight * max(elapsed / ramp, 0.05)

    def pick(self, key: bytes | None, exclude: Collection[str] = ()) -> Backend | None:
        """Choose an up backend for a new connection (None when none is up)."""
        up = self._up
        if exclude:
            up = [b for b in up if b.id not in exclude]
        elif len(up) == 1:
            return up[0]
        if not up:
            return None
        balance = self.config.balance
        if balance == "hash" and key is not None:
            return self._pick_hash(key, up, exclude)
        if balance == "round-robin":
            if up is self._up:
                return up[self._round_robin.pick(self._up_ids, self._up_weights)]
            return up[self._round_robin.pick([b.id for b in up], [b.weight for b in up])]
        now = self._clock()
        self._lc_start += 1
        index = least_connections(
            [self.load(b) for b in up],
            [self.effective_weight(b, now) for b in up],
            self._lc_start,
        )
        return up[index]

    def sticky_cookie(self, value: bytes | None) -> str | None:
        """A sticky cookie value to set for a request whose cookie is ``value`` (None: none).

        Nothing to set for a valid cookie of an up backend, nor for a value lbproxy did not
        sign (a client's own key, remembered by the affinity table). A missing cookie gets
        a new one for the backend bounded loads pick; a cookie whose backend is down or
        gone keeps its nonce and names the backend picked now.
        """
        if value is None:
            nonce = new_sticky_value()
        else:
            signed = self._signer.read(value)
            if signed is None:
                return None
            backend = self.backends.get(signed[1])
            if backend is not None and backend.state is BackendState.UP:
                return None
            nonce = signed[0].decode("ascii")
        chosen = self.pick(nonce.encode("ascii"))
        return None if chosen is None else self._signer.issue(nonce, chosen.id)

    def _pick_hash(self, key: bytes, up: list[Backend], exclude: Collection[str]) -> Backend:
        by_id = {b.id: b for b in up}
        signed = self._signer.read(key)
        if signed is not None:  # lbproxy's own cookie: its backend while that is up
            key, stuck = signed
            if stuck in by_id:
                return by_id[stuck]
        # (for a cookie whose backend is not usable: where its nonce went meanwhile)
        remembered = self._affinity.lookup(key, self._clock())
        if remembered is not None and remembered in by_id:
            return by_id[remembered]
        return by_id[self._ring_choice(key, by_id, self.config.hash_balance_factor)]

    def home(self, key: bytes) -> str | None:
        """Where ``key`` maps now, keys remembered aside: its cookie's backend while up, else
        its owner on the ring (loads aside). Rebalancing moves a tunnel whose home changed."""
        by_id = {b.id: b for b in self._up}
        signed = self._signer.read(key)
        if signed is not None:
            key, stuck = signed
            if stuck in by_id:
                return stuck
        return self._ring_choice(key, by_id, 0.0) if by_id else None

    def forget(self, key: bytes) -> None:
        """A key is being moved to its home: no longer remembered where it was."""
        signed = self._signer.read(key)
        self._affinity.forget(key if signed is None else signed[0])

    def _ring_choice(self, key: bytes, by_id: dict[str, Backend], factor: float) -> str:
        table = self._hash
        if table is None:
            table = self._hash = ConsistentHash([(b.id, b.weight) for b in self._up])
        preference = (i for i in table.preference(key_hash(key)) if i in by_id)
        if factor <= 0:
            return next(preference)
        active = {b.id: self.load(b) for b in self._up}
        return bounded_choice(preference, active, factor)
