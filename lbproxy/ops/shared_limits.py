"""Admission state of ``scope = "local"`` shared by the workers of ``serve --workers N``, so
the limits are the balancer's, not one worker's.

A fixed-size open-addressing table in the same ``memfd`` as the shared connection counts
(shared_counts.py), after them (the workers enlarge the file to fit; the supervisor never
reads it). One slot per (listener, client IP): its key hash, the GCRA theoretical arrival
time and one open-connection count per worker row (a worker writes only its own row; a
replacement worker zeroes its row's counts when it attaches, so a dead worker's count
goes with it). The decision is the same as in-process (limits.py) and made under an
``fcntl`` lock of the region (one lock and unlock per admission and per close). A slot
with no open connection and a TAT in the past is free for another key; when no slot is
found within ``PROBES`` the connection is admitted (fail open, never wrongly refused).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct

from lbproxy.config.types import LimitsConfig
from lbproxy.core.limits import ADMIT, CONNECTIONS, CONNECTIONS_RETRY_AFTER, RATE, Decision, gcra

SLOTS = 32768
PROBES = 16
HEAD = struct.Struct("<Qd")  # key hash, TAT (seconds of the monotonic clock)


def key_of(listener: str, ip: str) -> int:
    digest = hashlib.blake2b(f"{listener}\0{ip}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


class SharedLimits:
    """The table as one worker (``row``) of ``rows`` sees it."""

    def __init__(self, fd: int, offset: int, rows: int, row: int) -> None:
        self.fd, self.offset, self.rows, self.row = fd, offset, rows, row
        self.counts = struct.Struct(f"<{rows}I")
        self.slot = HEAD.size + self.counts.size
        self.size = SLOTS * self.slot
        if os.fstat(fd).st_size < offset + self.size:  # (every worker: the same size)
            os.ftruncate(fd, offset + self.size)
        self._map = mmap.mmap(fd, self.size, offset=offset)
        with self._locked():
            for index in range(SLOTS):
                at = index * self.slot + HEAD.size + 4 * row
                self._map[at : at + 4] = b"\0\0\0\0"

    def _locked(self) -> _Lock:
        return _Lock(self.fd, self.offset, self.size)

    def _find(self, key: int, now: float) -> tuple[int, bool]:
        """(slot offset, whether it holds ``key``); -1 when neither it nor a free slot."""
        free = -1
        for probe in range(PROBES):
            at = ((key + probe) % SLOTS) * self.slot
            held, tat = HEAD.unpack_from(self._map, at)
            if held == key:
                return at, True
            if free < 0 and (held == 0 or (tat <= now and not any(self._open(at)))):
                free = at
        return free, False

    def _open(self, at: int) -> tuple[int, ...]:
        return self.counts.unpack_from(self._map, at + HEAD.size)

    def admit(
        self, listener: str, ip: str, now: float, config: LimitsConfig, count: bool = True
    ) -> Decision:
        """Decide for a new connection (counted open in this worker's row when admitted and
        ``count``; else only the rate applies)."""
        key = key_of(listener, ip)
        with self._locked():
            at, found = self._find(key, now)
            if at < 0:
                return ADMIT
            opened = self._open(at) if found else (0,) * self.rows
            tat = HEAD.unpack_from(self._map, at)[1] if found else now
            if count and 0 < config.connections_per_ip <= sum(opened):
                return Decision(False, CONNECTIONS, CONNECTIONS_RETRY_AFTER)
            if config.rate_per_ip > 0:
                allowed, tat, retry = gcra(tat, now, config.rate_per_ip, config.burst)
                if not allowed:
                    return Decision(False, RATE, retry)
            mine = list(opened)
            mine[self.row] += 1 if count else 0
            HEAD.pack_into(self._map, at, key, tat)
            self.counts.pack_into(self._map, at + HEAD.size, *mine)
            return ADMIT

    def adopt(self, listener: str, ip: str, now: float) -> None:
        """Count a connection open in this worker's row without deciding (it moved here)."""
        key = key_of(listener, ip)
        with self._locked():
            at, found = self._find(key, now)
            if at < 0:
                return
            mine = list(self._open(at)) if found else [0] * self.rows
            tat = HEAD.unpack_from(self._map, at)[1] if found else now
            mine[self.row] += 1
            HEAD.pack_into(self._map, at, key, tat)
            self.counts.pack_into(self._map, at + HEAD.size, *mine)

    def closed(self, listener: str, ip: str) -> None:
        key = key_of(listener, ip)
        with self._locked():
            at, found = self._find(key, float("inf"))
            if found:
                at_row = at + HEAD.size + 4 * self.row
                (count,) = struct.unpack_from("<I", self._map, at_row)
                struct.pack_into("<I", self._map, at_row, max(count - 1, 0))

    def close(self) -> None:
        self._map.close()


class _Lock:
    __slots__ = ("fd", "offset", "size")

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd, self.offset, self.size = fd, offset, size

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, self.size, self.offset)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, self.size, self.offset)
