"""Balancer-wide connection counts shared by the workers of `serve --workers N`.

A shared-memory table of int32: one row per worker slot, one column
per backend slot (like NGINX's upstream ``zone``). A worker writes only its own row (its
own open connections per backend), so no lock or atomic is needed; readers sum a column
over the rows. The supervisor creates the table, assigns columns to backends (pushed to the
workers with the pool snapshot) and zeroes the row of a worker that died.

Column 0 is reserved: ``NO_COLUMN`` means "not assigned yet" (the worker then counts the
connection in its own process only until the next snapshot assigns one).
"""

from __future__ import annotations

import mmap
import os

MAX_BACKENDS = 4096  # backend slots of the table (a fixed size: documented in the README)
NO_COLUMN = 0
ITEM = 4  # int32


class SharedCounts:
    """The table; ``row`` is this process's own row (-1: a reader, e.g. the supervisor).

    The memory is an anonymous ``memfd`` (no name in /dev/shm, nothing to unlink, no
    resource-tracker process): the supervisor passes its descriptor to each worker."""

    def __init__(self, fd: int, rows: int, columns: int, row: int) -> None:
        self.fd = fd
        self.rows = rows
        self.columns = columns
        self.row = row
        self._map = mmap.mmap(fd, rows * columns * ITEM)
        self._cells = memoryview(self._map).cast("i")

    @classmethod
    def create(cls, rows: int, columns: int = MAX_BACKENDS) -> SharedCounts:
        fd = os.memfd_create("lbproxy-counts", 0)  # close-on-exec: passed on explicitly
        os.ftruncate(fd, rows * columns * ITEM)  # zero-filled
        return cls(fd, rows, columns, -1)

    @classmethod
    def attach(cls, fd: int, rows: int, row: int, columns: int = MAX_BACKENDS) -> SharedCounts:
        return cls(fd, rows, columns, row)

    def set(self, column: int, value: int) -> None:
        """This process's count for ``column`` (its own row only)."""
        if self.row >= 0 and 0 < column < self.columns:
            self._cells[self.row * self.columns + column] = value

    def total(self, column: int) -> int:
        """The balancer-wide count of ``column``: the sum over every worker's row."""
        if not 0 < column < self.columns:
            return 0
        return sum(self._cells[column :: self.columns])

    def row_total(self, row: int) -> int:
        """Every connection worker ``row`` holds."""
        start = row * self.columns
        return sum(self._cells[start : start + self.columns])

    def zero_row(self, row: int) -> None:
        """A worker died: what it held stops counting at once."""
        start = row * self.columns * ITEM
        self._map[start : start + self.columns * ITEM] = bytes(self.columns * ITEM)

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        os.close(self.fd)


class Columns:
    """The supervisor's free list of columns. A backend instance keeps the column it was
    given (Backend.column) for its life; a column is reused only once no backend of the
    supervisor has it and no worker counts anything there any more."""

    def __init__(self, columns: int = MAX_BACKENDS) -> None:
        self._columns = columns
        self._used: set[int] = set()
        self._free: list[int] = []
        self._next = 1

    def take(self) -> int:
        """A column nobody uses (NO_COLUMN when the table is full)."""
        if self._free:
            found = self._free.pop()
        elif self._next < self._columns:
            found = self._next
            self._next += 1
        else:
            return NO_COLUMN  # table full: counted per worker only (logged by the caller)
        self._used.add(found)
        return found

    def claim(self, column: int) -> None:
        """A column given out before the supervisor re-executed itself (lbproxy upgrade)."""
        if 0 < column < self._columns and column not in self._used:
            if column in self._free:
                self._free.remove(column)
            self._free += range(self._next, column)
            self._next = max(self._next, column + 1)
            self._used.add(column)

    def release_unused(self, live: set[int], counts: SharedCounts) -> None:
        """Free the columns not in ``live`` (those of the supervisor's backends) whose
        count dropped to zero."""
        for col in list(self._used):
            if col not in live and counts.total(col) == 0:
                self._used.discard(col)
                self._free.append(col)
