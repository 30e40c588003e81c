"""Body trackers: follow a message body as it streams through and find where it ends.

Neither tracker copies the body: inside chunk data (or a Content-Length body) a ``feed`` is a
few integer operations whatever the size of ``data``. Only chunk-size and trailer lines (at most
:data:`MAX_LINE` bytes each) are looked at byte-wise.
"""

from __future__ import annotations

import re

from lbproxy.core.http1._types import MAX_HEAD
from lbproxy.errors import HttpError

Data = bytes | bytearray | memoryview
MAX_LINE = 4096
MAX_TRAILERS = MAX_HEAD
MAX_CHUNK = (1 << 63) - 1  # larger sizes read as negative in an int64 parser: a desync risk
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n\x00]*)?")

_TRAILER_FIELD = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[^\x00\r\n]*\r\n")
_FIRST_WINDOW = 64

_SIZE, _DATA, _DATA_CR, _DATA_LF, _TRAILER, _DONE = range(6)


def _find_newline(data: Data, pos: int, stop: int) -> tuple[bytes | bytearray, int]:
    """``(data[pos:stop], index of the first LF in it or -1)``; a memoryview is copied a little
    at a time so that many small chunks do not cost a 4 KiB copy each."""
    if not isinstance(data, memoryview):
        window = data[pos:stop]
        return window, window.find(b"\n")
    window = bytes(data[pos : min(stop, pos + _FIRST_WINDOW)])
    newline = window.find(b"\n")
    if newline < 0 and pos + len(window) < stop:
        window = bytes(data[pos:stop])
        newline = window.find(b"\n", _FIRST_WINDOW)
    return window, newline


class LengthTracker:
    """A Content-Length body: counts down ``remaining``."""

    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        if length < 0:
            raise ValueError("negative body length")
        self.remaining = length

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, data: Data, start: int = 0) -> int:
        """Consume ``data[start:]``: -1 if it all belongs to the body and the body goes on, else
        the index in ``data`` just past the body's last byte."""
        available = len(data) - start
        if available < self.remaining:
            self.remaining -= available
            return -1
        end = start + self.remaining
        self.remaining = 0
        return end


class ChunkedTracker:
    """A chunked body: a state machine over size lines, chunk data, CRLFs and trailers, fed
    with any split of the stream. Errors raise HttpError(``error_status``): 400 for request
    bodies (the default), 502 for response bodies."""

    __slots__ = ("_error_status", "_line", "_remaining", "_state", "_trailer_bytes")

    def __init__(self, error_status: int = 400) -> None:
        self._error_status = error_status
        self._state = _SIZE
        self._remaining = 0  # bytes of chunk data still to come
        self._line = bytearray()  # a size or trailer line split across feeds
        self._trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: Data, start: int = 0) -> int:
        """Consume ``data[start:]``: -1 if it all belongs to the body and the body goes on, else
        the index in ``data`` just past the body (after the last chunk, trailers and CRLF)."""
        pos, end = start, len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                if end - pos < self._remaining:
                    self._remaining -= end - pos
                    return -1
                pos += self._remaining
                self._remaining = 0
                self._state = _DATA_CR
            elif state in (_DATA_CR, _DATA_LF):
                pos = self._expect_crlf(data, pos)
            elif state == _DONE:
                return pos
            else:
                pos = self._line_step(data, pos, end)
        return pos if self._state == _DONE else -1

    def _fail(self, reason: str) -> HttpError:
        return HttpError(self._error_status, f"bad chunked body: {reason}")

    def _expect_crlf(self, data: Data, pos: int) -> int:
        wanted = 13 if self._state == _DATA_CR else 10
        if data[pos] != wanted:
            raise self._fail("missing CRLF after chunk data")
        self._state = _DATA_LF if wanted == 13 else _SIZE
        return pos + 1

    def _line_step(self, data: Data, pos: int, end: int) -> int:
        """Read (part of) a size or trailer line; return the position after what was used."""
        room = MAX_LINE + 2 - len(self._line)
        window, newline = _find_newline(data, pos, min(end, pos + room))
        if newline < 0:
            if len(window) >= room:
                raise self._fail("line longer than 4 KiB")
            self._line += window
            return end
        if self._line:
            self._line += window[: newline + 1]
            line = bytes(self._line)
            self._line.clear()
        else:
            line = bytes(window[: newline + 1])
        self._end_of_line(line)
        return pos + newline + 1

    def _end_of_line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n") or line.find(b"\r", 0, len(line) - 2) >= 0:
            raise self._fail("line not ended by CRLF")
        if self._state == _TRAILER:
            self._trailer_line(line)
            return
        match = _CHUNK_SIZE.fullmatch(line, 0, len(line) - 2)
        if match is None:
            raise self._fail(f"invalid chunk-size line {line[:40]!r}")
        size = int(match.group(1), 16)
        if size > MAX_CHUNK:
            raise self._fail("chunk size of 2^63 or more")
        if size:
            self._remaining = size
            self._state = _DATA
        else:
            self._state = _TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if line == b"\r\n":
            self._state = _DONE
            return
        self._trailer_bytes += len(line)
        if self._trailer_bytes > MAX_TRAILERS:
            raise self._fail("trailer section too long")
        if not _TRAILER_FIELD.fullmatch(line):
            raise self._fail("malformed trailer line")
