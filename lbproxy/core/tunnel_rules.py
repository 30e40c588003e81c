"""The tunnel contract, sans-IO: per-side modes, the go-away rule, the close frame.

Written once, applied by both engines: the Python tunnel (tunnel.py) reads these
values directly, and the native engine (_splice.c) receives them at start
(``engine_setup``) as a table of codes and the close frame's bytes, so it never
repeats a rule — it moves bytes, follows frames, and looks up what to do.

A tunnel has two sides (client, backend). Each side is in one ``Mode``:

- ``FORWARD``: what is read from it goes to the other side (EOF is passed on as a
  half-close);
- ``DROP``: it was sent a FIN; its input is read and dropped until it closes;
- ``CLOSE_ON_DATA``: it was sent a websocket close; anything it sends (its close
  reply) ends it (RFC 6455 7.1.1: the server closes TCP first);
- ``CLOSED``.

Draining a tunnel (``go_away``) picks a ``GoAway`` action from what the frame
cursor knows; the action names the modes both sides move to.
"""

from __future__ import annotations

import struct
from enum import IntEnum

OPCODE_CLOSE = 0x8
GOING_AWAY = 1001
MAX_CONTROL_PAYLOAD = 125  # RFC 6455 5.5
MAX_FRAME_HEADER = 14  # 2 + 8 (64-bit length) + 4 (mask)


def close_frame(code: int = GOING_AWAY, reason: bytes = b"", mask: bytes | None = None) -> bytes:
    """An RFC 6455 close frame; unmasked (server -> client) unless ``mask`` is given."""
    payload = struct.pack("!H", code) + reason[: MAX_CONTROL_PAYLOAD - 2]
    if mask is None:
        return bytes((0x80 | OPCODE_CLOSE, len(payload))) + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | OPCODE_CLOSE, 0x80 | len(payload))) + mask + masked


GOING_AWAY_FRAME = close_frame(GOING_AWAY, b"backend going away")


class Mode(IntEnum):
    """What a tunnel side does with its input (the values are the engine's codes)."""

    FORWARD = 0
    DROP = 1
    CLOSE_ON_DATA = 2
    CLOSED = 3


TRANSITIONS: frozenset[tuple[Mode, Mode]] = frozenset(
    {
        (Mode.FORWARD, Mode.DROP),
        (Mode.FORWARD, Mode.CLOSE_ON_DATA),
        (Mode.FORWARD, Mode.CLOSED),
        (Mode.DROP, Mode.CLOSED),
        (Mode.CLOSE_ON_DATA, Mode.CLOSED),
    }
)


class Where(IntEnum):
    """Which engine forwards a tunnel (the Python tunnel hands over to the native one)."""

    PYTHON = 0
    NATIVE = 1
    NATIVE_DONE = 2  # the engine reported the end (or was told to close it)


WHERE_TRANSITIONS: frozenset[tuple[Where, Where]] = frozenset(
    {(Where.PYTHON, Where.NATIVE), (Where.NATIVE, Where.NATIVE_DONE)}
)


# The members as module constants, for the hot paths to import: on Python 3.11, reading a
# member off its class (Where.NATIVE) goes through the EnumType.__getattr__ hook (~0.25 us
# a time), a module global costs ~0.02 us.
FORWARD, CLOSED = Mode.FORWARD, Mode.CLOSED
PYTHON, NATIVE, NATIVE_DONE = Where.PYTHON, Where.NATIVE, Where.NATIVE_DONE


class IllegalTransition(RuntimeError):
    """A state was asked to move where the contract does not allow from where it is."""


def check(
    table: frozenset[tuple[Mode, Mode]] | frozenset[tuple[Where, Where]], now: IntEnum, to: IntEnum
) -> None:
    """Raise ``IllegalTransition`` unless ``now -> to`` is in ``table``."""
    if (now, to) not in table:
        raise IllegalTransition(f"{now.name} -> {to.name}")


class Side:
    """One side's mode; ``move`` is the only way to change it.

    The tunnel's two protocols (tunnel.py's ClientHalf and Link) *are* their sides (they
    inherit this), so an established tunnel costs no extra object per side."""

    __slots__ = ("mode",)

    def __init__(self, mode: Mode = Mode.FORWARD) -> None:
        self.mode = mode

    def move(self, to: Mode) -> None:
        check(TRANSITIONS, self.mode, to)
        self.mode = to

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode.name})"


class GoAway(IntEnum):
    """What a drain does to a tunnel (the values are the engine's codes)."""

    WAIT_BOUNDARY = 0  # a frame is in flight: forward to its end, then decide again
    PART = 1  # FIN both ways, drop what still comes
    CLOSE_FRAME = 2  # send the 1001 close to the client first, then as PART but see AFTER


# The modes (client, backend) each action moves the two sides to (both also get a FIN).
AFTER: dict[GoAway, tuple[Mode, Mode]] = {
    GoAway.PART: (Mode.DROP, Mode.DROP),
    GoAway.CLOSE_FRAME: (Mode.CLOSE_ON_DATA, Mode.DROP),
}


def go_away(ws: bool, saw_close: bool, at_boundary: bool) -> GoAway:
    """The go-away rule: plain TCP parts at once; a websocket whose backend already sent
    a close parts too (no second close); else a 1001 at the next frame boundary."""
    if not ws or saw_close:
        return GoAway.PART
    return GoAway.CLOSE_FRAME if at_boundary else GoAway.WAIT_BOUNDARY


def engine_rules() -> bytes:
    """The contract as the native engine takes it at start.

    Bytes 0-7: ``go_away(ws, saw_close, at_boundary)`` at index ws<<2 | saw_close<<1 |
    at_boundary. Bytes 8-13: AFTER as (client, backend) for WAIT_BOUNDARY (unused),
    PART, CLOSE_FRAME.
    """
    table = bytearray()
    for index in range(8):
        table.append(go_away(bool(index & 4), bool(index & 2), bool(index & 1)))
    for action in GoAway:
        table.extend(AFTER.get(action, (Mode.FORWARD, Mode.FORWARD)))
    return bytes(table)


def engine_setup() -> tuple[bytes, bytes]:
    """What ``_splice.Engine`` takes at start: the rules, and the close frame to send."""
    return engine_rules(), GOING_AWAY_FRAME
