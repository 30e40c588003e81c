"""The values a pool is made of: a backend, its state, and what a connection on it must do.

Types only (no I/O, no policy): the pool (pool.py) changes them; everything else reads them.
"""

from __future__ import annotations

import enum
from typing import Protocol

from lbproxy.config.types import Address
from lbproxy.core.shared_counts import NO_COLUMN


class BackendState(enum.Enum):
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"


class Closable(Protocol):
    """A proxied connection that can be asked to leave its backend gracefully."""

    def go_away(self) -> None:
        """Close cleanly: websocket close 1001 at a frame boundary, then FIN both sides."""


class Backend:
    """One backend of a pool. Mutable; changed only through its Pool."""

    __slots__ = (
        "active",
        "address",
        "column",
        "connections",
        "failures",
        "id",
        "leaving",
        "removed",
        "source",
        "state",
        "up_since",
        "weight",
    )

    def __init__(self, id: str, address: Address, weight: int, source: str) -> None:
        self.id = id
        self.address = address
        self.weight = weight
        self.source = source  # "static" | "redis"
        self.state = BackendState.UP
        self.active = 0  # this process's open connections (Pool.active: the balancer's)
        self.column = NO_COLUMN  # its column of the shared count table (--workers N)
        self.connections: set[Closable] = set()
        self.leaving: set[Closable] = set()  # told to go away: still open, no longer active
        self.failures = 0  # consecutive failed proxied connects (passive health)
        self.up_since = 0.0  # monotonic time it last became up (slow start)
        self.removed = False  # gone from configuration/registry; kept while draining

    def __repr__(self) -> str:
        return f"Backend({self.id!r}, {self.address}, {self.state.value}, active={self.active})"
