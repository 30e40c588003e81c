"""Sans-IO websocket frame boundaries (server -> client direction).

(The close frames are built in tunnel_rules; ``close_frame`` is re-exported here.)

The tunnel forwards bytes untouched; to inject a close frame (1001 Going Away)
at drain time without cutting a frame in half, it must know where frames end in
the backend -> client stream. ``FrameCursor`` follows that with O(1) work per
chunk inside a large frame and a few index operations per frame header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lbproxy.core.tunnel_rules import GOING_AWAY as GOING_AWAY
from lbproxy.core.tunnel_rules import OPCODE_CLOSE
from lbproxy.core.tunnel_rules import close_frame as close_frame
from lbproxy.core.ws_rules import DATA, OPCODES


class FrameScan:
    """Tracks frame boundaries in a websocket byte stream fed chunk by chunk.

    ``skip`` is the number of bytes until the next frame header; ``partial``
    holds the start of a header split across chunks. ``saw_close`` turns true
    once a close frame header went by (the peer is closing by itself). A mixin
    without slots of its own, so the tunnel protocol can carry the three fields
    itself and its hot path reads them without an extra indirection.
    """

    if not TYPE_CHECKING:  # no slots of its own (mypy: the concrete classes declare them)
        __slots__ = ()
    skip: int
    partial: bytes
    saw_close: bool
    messages: int

    @property
    def at_boundary(self) -> bool:
        return self.skip == 0 and not self.partial

    def feed(self, data: bytes) -> None:
        """Advance over ``data`` (the caller forwards it unchanged)."""
        n = len(data)
        skip = self.skip
        if n <= skip and not self.partial:
            self.skip = skip - n
            return
        self._scan(data)

    def to_boundary(self, data: bytes) -> int:
        """How many bytes of ``data`` complete the current frame (0 = at a boundary already).

        -1 when the frame does not end within ``data``. Does not advance the cursor.
        """
        if self.at_boundary:
            return 0
        if not self.partial:
            return self.skip if self.skip <= len(data) else -1
        buf = self.partial + data
        length = _frame_length(buf, 0)
        if length is None:
            return -1
        end = length - len(self.partial)
        return end if end <= len(data) else -1

    def _scan(self, data: bytes) -> None:
        """Walk the frame headers that start within ``data``."""
        buf = self.partial + data if self.partial else data
        pos = self.skip if not self.partial else 0
        n = len(buf)
        while pos < n:
            length = _frame_length(buf, pos)
            if length is None:  # header incomplete
                self.partial = bytes(buf[pos:])
                self.skip = 0
                return
            b0 = buf[pos]
            if b0 & 0x0F == OPCODE_CLOSE:
                self.saw_close = True
            elif b0 & 0x80 and OPCODES[b0 & 0x0F] & DATA:
                self.messages += 1  # (data messages counted at their final frame)
            pos += length
        self.partial = b""
        self.skip = pos - n


def frame_header(buf: bytes, pos: int) -> tuple[int, int] | None:
    """(header length, payload length) of the frame starting at ``pos``, None if its header
    is incomplete (the 7-, 16- and 64-bit length forms; a masked frame's header has the
    4-byte key: only the payload is masked)."""
    avail = len(buf) - pos
    if avail < 2:
        return None
    b1 = buf[pos + 1]
    size = b1 & 0x7F
    header = 2
    if size == 126:
        header = 4
        if avail < 4:
            return None
        size = (buf[pos + 2] << 8) | buf[pos + 3]
    elif size == 127:
        header = 10
        if avail < 10:
            return None
        size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
    if b1 & 0x80:
        header += 4
        if avail < header:
            return None
    return header, size


def _frame_length(buf: bytes, pos: int) -> int | None:
    """Total length (header + payload) of the frame starting at ``pos``, None if incomplete."""
    found = frame_header(buf, pos)
    return None if found is None else found[0] + found[1]


class FrameCursor(FrameScan):
    """A standalone frame scanner."""

    __slots__ = ("messages", "partial", "saw_close", "skip")

    def __init__(self) -> None:
        self.skip = 0
        self.partial = b""
        self.saw_close = False
        self.messages = 0
