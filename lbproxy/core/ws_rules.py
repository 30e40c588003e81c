"""Websocket-aware tunnel rules (SPEC 11), sans-IO: pings, dead peers, message limits.

Written once, applied by both engines. The Python tunnel (tunnel.py, wsscan.py) calls
these functions; the native engine (_splice.c) is handed the same rules as data at start
(``engine_ws_setup``): the opcode table, the limits in integer nanoseconds and bytes, and
the frames to send for each kind of close. It then only looks them up while it follows
the frames it forwards anyway.

- **Client -> backend frames** are followed (the header is not masked, only the payload,
  so nothing is unmasked). At each frame header ``frame_verdict`` decides: a data message
  over ``max_message`` (all its fragments) is ``MESSAGE_TOO_BIG``, a new data message
  beyond the rate (GCRA, ``max_messages_per_second`` and ``burst``) is ``MESSAGE_RATE``.
  While a limit is on, a header split across reads is held back until it is complete, so
  the frame a verdict refuses is never forwarded, not even its first header bytes.
- **Pings**: ``sweep_action`` on how long the client has been silent: a ping (sent at a
  backend -> client frame boundary), then ``DEAD`` (client TCP closed, the backend gets a
  masked 1001 at a client -> backend frame boundary).
- **Closes** (``CLOSES``): what each kind of close sends the client and the backend; the
  frame to the client waits for a backend -> client boundary (tunnel_rules.go_away).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from lbproxy.core.tunnel_rules import GOING_AWAY, GOING_AWAY_FRAME, close_frame

if TYPE_CHECKING:
    from lbproxy.config.types import WebsocketConfig

POLICY_VIOLATION = 1008  # RFC 6455 7.4.1
MESSAGE_TOO_BIG = 1009
PING_FRAME = bytes((0x89, 0x00))  # an empty ping, server -> client (unmasked)
NS = 1_000_000_000

# Opcode flags (the engine's table, one byte per opcode 0-15)
STARTS = 1  # begins a data message (text, binary): new length, one message for the rate
CONTINUES = 2  # continues the data message (continuation): its length adds up
DATA = 4  # a data frame: with FIN set, one message is counted


def opcode_flags(opcode: int) -> int:
    """RFC 6455 5.2: 0 continuation, 1 text, 2 binary (3-7 reserved), 8-15 control."""
    if opcode == 0:
        return CONTINUES | DATA
    if opcode in (1, 2):
        return STARTS | DATA
    return 0  # control frames (legal between fragments) and reserved ones: size check only


OPCODES = bytes(opcode_flags(op) for op in range(16))


class CloseKind(IntEnum):
    """Why lbproxy closed a websocket (the values are the engine's codes)."""

    NONE = 0
    DRAIN = 1
    MESSAGE_TOO_BIG = 2
    MESSAGE_RATE = 3
    DEAD_PEER = 4


class Verdict(IntEnum):
    """What a client -> backend frame header leads to (values are CloseKind codes)."""

    PASS = 0
    MESSAGE_TOO_BIG = CloseKind.MESSAGE_TOO_BIG
    MESSAGE_RATE = CloseKind.MESSAGE_RATE


class Tick(IntEnum):
    """What the sweep does to a tunnel whose client has been silent."""

    NOTHING = 0
    PING = 1
    DEAD = 2


def closes(mask: bytes) -> dict[CloseKind, tuple[bytes, bytes]]:
    """(to the client, to the backend) per kind; b"" = nothing. ``mask``: 4 bytes, the
    masking key of the frames lbproxy sends the backend (a client's frames are masked)."""
    to_backend = close_frame(GOING_AWAY, b"client going away", mask)
    return {
        CloseKind.NONE: (b"", b""),
        CloseKind.DRAIN: (GOING_AWAY_FRAME, b""),  # the backend is the one leaving: FIN
        CloseKind.MESSAGE_TOO_BIG: (close_frame(MESSAGE_TOO_BIG, b"message too big"), to_backend),
        CloseKind.MESSAGE_RATE: (close_frame(POLICY_VIOLATION, b"message rate"), to_backend),
        CloseKind.DEAD_PEER: (b"", to_backend),  # the client's TCP is closed, no frame
    }


# lbproxy_ws_closes_total{reason}: lbproxy's own closes, else who closed first
METRIC_REASONS = {
    CloseKind.DRAIN: "drain",
    CloseKind.MESSAGE_TOO_BIG: "message_too_big",
    CloseKind.MESSAGE_RATE: "message_rate",
    CloseKind.DEAD_PEER: "dead_peer",
}


CLOSERS = {1: "client", 2: "backend"}  # the engine's first_close codes


def close_reason(kind: CloseKind, first_close: int, reason: str) -> str | None:
    """The ``reason`` label of a finished websocket tunnel: lbproxy's own close, else the
    side that sent the first close frame (``first_close``: 1 client, 2 backend, 0 none),
    else the side whose connection ended first (``reason``, the tunnel's reason text).
    None: not counted (an idle timeout, a shutdown abort)."""
    if kind in METRIC_REASONS:
        return METRIC_REASONS[kind]
    if first_close in CLOSERS:
        return CLOSERS[first_close]
    if reason.startswith("drained"):
        return "drain"
    for side in ("client", "backend"):
        if reason.startswith(side):
            return side
    return None


@dataclass(frozen=True, slots=True)
class WsPolicy:
    """One pool's [pools.NAME.websocket] keys as the tunnels use them (0 = off)."""

    ping_interval: float = 0.0
    ping_timeout: float = 10.0
    max_message: int = 0
    emission: float = 0.0  # seconds per message at the allowed rate
    tolerance: float = 0.0  # burst * emission: how far ahead of the rate a client may be

    @classmethod
    def of(
        cls,
        ping_interval: float,
        ping_timeout: float,
        max_message: int,
        max_messages_per_second: float,
        burst: int,
    ) -> WsPolicy:
        emission = 1.0 / max_messages_per_second if max_messages_per_second > 0 else 0.0
        allowed = burst if burst > 0 else max(1, int(max_messages_per_second + 0.999))
        return cls(ping_interval, ping_timeout, max_message, emission, allowed * emission)

    @property
    def limits(self) -> bool:
        """Whether client frame headers must be decided before they are forwarded."""
        return self.max_message > 0 or self.emission > 0

    @property
    def pings(self) -> bool:
        return self.ping_interval > 0

    @property
    def swept(self) -> bool:
        """Whether the listener's sweep has work: pings, or the grace of refused tunnels."""
        return self.pings or self.limits


OFF = WsPolicy()


def ws_policy(config: WebsocketConfig) -> WsPolicy:
    """A pool's [pools.NAME.websocket] table as the tunnels apply it."""
    return WsPolicy.of(
        config.ping_interval,
        config.ping_timeout,
        config.max_message,
        config.max_messages_per_second,
        config.burst,
    )


# the reason text of a tunnel lbproxy closed itself (access log)
REASON_TEXT = {
    CloseKind.MESSAGE_TOO_BIG: "message too big (1009)",
    CloseKind.MESSAGE_RATE: "message rate exceeded (1008)",
    CloseKind.DEAD_PEER: "dead peer (no answer to ping)",
}


def gcra(tat: float, now: float, emission: float, tolerance: float) -> tuple[bool, float]:
    """Generic cell rate algorithm: (allowed, new theoretical arrival time)."""
    new = max(tat, now) + emission
    # (a nanosecond of slack: float sums round where the engine's integer nanoseconds do
    # not, and the burst-th message sent at once must pass on both engines)
    if new - now > tolerance + 1e-9:
        return False, tat
    return True, new


def frame_verdict(
    flags: int, payload: int, msg_len: int, tat: float, now: float, policy: WsPolicy
) -> tuple[Verdict, int, float]:
    """The rule at a client -> backend frame header: (verdict, message length, tat).

    ``flags``: opcode_flags of its opcode; ``payload``: its payload length; ``msg_len``:
    the bytes of the data message so far. A control frame is checked alone."""
    total = payload
    if flags & CONTINUES:
        total += msg_len
    if policy.max_message and total > policy.max_message:
        return Verdict.MESSAGE_TOO_BIG, msg_len, tat
    if flags & STARTS and policy.emission > 0:
        allowed, tat = gcra(tat, now, policy.emission, policy.tolerance)
        if not allowed:
            return Verdict.MESSAGE_RATE, msg_len, tat
    if flags & (STARTS | CONTINUES):
        msg_len = total
    return Verdict.PASS, msg_len, tat


def sweep_action(silent: float, pinged: bool, policy: WsPolicy) -> Tick:
    """``silent``: seconds since the client last sent a byte; ``pinged``: a ping already
    went out in this silence."""
    if not policy.pings or silent < policy.ping_interval:
        return Tick.NOTHING
    if silent >= policy.ping_interval + policy.ping_timeout:
        return Tick.DEAD
    return Tick.NOTHING if pinged else Tick.PING


def ping_timeouts(policy: WsPolicy) -> tuple[float, ...]:
    """What the listener's sweep tick must follow (deadlines.sweep_tick) for the pings."""
    return (policy.ping_interval, policy.ping_timeout) if policy.pings else ()


def engine_ws_setup(
    policy: WsPolicy, mask: bytes
) -> tuple[tuple[int, int, int, int, int], bytes, tuple[bytes, ...], bytes]:
    """What ``Engine.ws_policy`` takes: (ping_interval, ping_timeout, max_message,
    emission, tolerance) in ns and bytes, the opcode table, per CloseKind the frames
    (client, backend) flattened, and the ping frame."""
    params = (
        round(policy.ping_interval * NS),
        round(policy.ping_timeout * NS),
        policy.max_message,
        round(policy.emission * NS),
        round(policy.tolerance * NS),
    )
    table = closes(mask)
    frames = tuple(frame for kind in CloseKind for frame in table[kind])
    return params, OPCODES, frames, PING_FRAME
