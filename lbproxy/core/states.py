"""The proxy's state machines as data (h11 ``_state.py`` style).

Each machine is an Enum and a table of the transitions it allows; ``advance`` is the one
way a connection changes its state, and raises ``IllegalTransition`` on a pair the table
does not hold (a bug, never a client's doing). Imports nothing from the package but
``errors``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

from lbproxy.errors import LbproxyError

E = TypeVar("E", bound=enum.Enum)


class IllegalTransition(LbproxyError):
    """A state machine was asked for a transition its table does not allow."""


# (IntEnum: a member hashes in C, and the table is looked up on every request)
class ClientState(enum.IntEnum):
    """A client connection of an http listener."""

    HEAD = 0  # reading a request head (or idle between requests)
    CONNECTING = 1  # picking / connecting a backend for the request
    FORWARD = 2  # request body streaming and/or waiting for the response
    DONE = 3  # closed, rejected, or handed to a tunnel


class UpstreamState(enum.IntEnum):
    """A (keep-alive) connection to a backend, one request at a time."""

    IDLE = 0  # no request (kept alive, or done)
    HEAD = 1  # a request sent: waiting for its response head
    BODY = 2  # forwarding the response body


_C = ClientState
_U = UpstreamState

CLIENT_TRANSITIONS: Mapping[ClientState, frozenset[ClientState]] = {
    _C.HEAD: frozenset({_C.CONNECTING, _C.FORWARD, _C.DONE}),  # FORWARD: the fast lane
    _C.CONNECTING: frozenset({_C.FORWARD, _C.DONE}),
    _C.FORWARD: frozenset({_C.HEAD, _C.CONNECTING, _C.DONE}),  # CONNECTING: a retry
    _C.DONE: frozenset({_C.DONE}),  # (closing twice is harmless)
}

UPSTREAM_TRANSITIONS: Mapping[UpstreamState, frozenset[UpstreamState]] = {
    _U.IDLE: frozenset({_U.HEAD, _U.IDLE}),
    _U.HEAD: frozenset({_U.BODY, _U.IDLE}),
    _U.BODY: frozenset({_U.IDLE}),
}


def check(table: Mapping[E, frozenset[E]], old: E, new: E) -> None:
    """Raise ``IllegalTransition`` unless ``table`` allows ``old`` -> ``new``."""
    if new not in table[old]:
        raise IllegalTransition(f"{type(old).__name__}: {old.name} -> {new.name}")
