"""The client -> backend frame scanner of the Python tunnel, sans-IO (ws_rules' rules).

``ClientFrames.feed`` takes what the client sent and says what of it to forward and
whether a frame was refused. It counts data messages (at their final frame) and, while a
limit is on, decides each frame header before any byte of it is forwarded: a header split
across reads is held back until complete. The native engine does the same in C
(``client_frames`` in _splice.c); tests/contract runs one suite on both.
"""

from __future__ import annotations

from lbproxy.core.tunnel_rules import OPCODE_CLOSE
from lbproxy.core.ws_rules import DATA, OPCODES, Verdict, WsPolicy, frame_verdict
from lbproxy.core.wsframe import frame_header


class ClientFrames:
    """Follows the client's frames: ``skip`` payload bytes left of the current frame,
    ``head`` a header split across reads (not yet forwarded while ``policy.limits``)."""

    __slots__ = ("closing", "head", "messages", "msg_len", "policy", "skip", "tat")

    def __init__(self, policy: WsPolicy) -> None:
        self.policy = policy
        self.skip = 0
        self.head = b""
        self.msg_len = 0  # bytes of the current data message (all its fragments)
        self.messages = 0
        self.tat = 0.0  # the message rate's theoretical arrival time (ws_rules.gcra)
        self.closing = False  # the client sent a close frame

    @property
    def at_boundary(self) -> bool:
        """Whether the backend's stream is between frames (held header bytes never went)."""
        return self.skip == 0 and (not self.head or self.policy.limits)

    @property
    def clean(self) -> bool:
        """At a boundary and outside a fragmented message (the engine may take over)."""
        return self.skip == 0 and not self.head and not self.msg_len

    def feed(self, data: bytes, now: float = 0.0) -> tuple[bytes, Verdict]:
        """(bytes to forward now, verdict). ``now``: time.monotonic(), for the message rate.

        On a refusal, what is returned is what precedes the refused frame."""
        limits = self.policy.limits
        head = self.head
        buf = head + data if head else data
        pos = self.skip
        n = len(buf)
        while pos < n:
            found = frame_header(buf, pos)
            if found is None:  # a header split across reads
                self.head = buf[pos:]
                self.skip = 0
                return (buf[:pos] if limits else data), Verdict.PASS
            header, payload = found
            b0 = buf[pos]
            flags = OPCODES[b0 & 0x0F]
            if b0 & 0x0F == OPCODE_CLOSE:
                self.closing = True
            if limits:
                verdict, self.msg_len, self.tat = frame_verdict(
                    flags, payload, self.msg_len, self.tat, now, self.policy
                )
                if verdict is not Verdict.PASS:
                    self.head = b""
                    self.skip = 0
                    return buf[:pos], verdict
            if b0 & 0x80 and flags & DATA:  # the final frame of a data message
                self.messages += 1
                self.msg_len = 0
            pos += header + payload
        self.head = b""
        self.skip = pos - n
        return (buf if limits else data), Verdict.PASS
