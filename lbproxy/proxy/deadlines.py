"""The deadlines the listener's sweep enforces (SPEC 15 "Timeouts", 16 "Upstream keep-alive").

Pure: which wait a client connection is in, how often the sweep must look, what a missed
response deadline leads to. No per-connection timers: a connection stores its deadline in
``ListenerContext.deadlines`` and the listener's one sweep task checks them.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable

from lbproxy.core.retry import Answer, Facts, Failure, Retry, decide

MIN_TICK = 0.05  # the sweep never runs more often than this
MAX_TICK = 1.0  # nor less often (the idle sweep keeps its own, slower, cadence)
BODY_CHECKS = 4  # a streaming request body is looked at this many times per body_timeout


class Wait(enum.Enum):
    """What a client connection with a deadline is waiting for."""

    HEAD = "head"  # a request head (from the accept, or its first bytes): handshake_timeout
    KEEPALIVE = "keepalive"  # the next request on an idle connection: keepalive_timeout
    BODY = "body"  # more of the request body: body_timeout without a byte -> 408
    RESPONSE = "response"  # the backend's response head: response_timeout -> 504 / retry


class AfterTimeout(enum.Enum):
    """What to do once a backend sent no response head within response_timeout."""

    RETRY = "retry"  # a bodiless request nothing reached the client for: another backend
    ANSWER = "answer"  # 504 to the client
    CLOSE = "close"  # bytes of this response already reached the client: just close


def untried(states: Iterable[tuple[str, bool]], tried: Collection[str]) -> bool:
    """Whether any ``(backend id, is up)`` is up and not in ``tried``."""
    return any(up and backend_id not in tried for backend_id, up in states)


def sweep_tick(*timeouts: float) -> float:
    """Seconds between sweeps: a quarter of the shortest timeout, within [MIN_TICK, MAX_TICK]."""
    return min(MAX_TICK, max(MIN_TICK, min(timeouts) / 4))


def idle_tick(idle_timeout: float) -> float:
    """Seconds between idle-tunnel scans (every connection is looked at)."""
    return max(0.25, min(idle_timeout / 4, 15.0))


def after_response_timeout(
    *, answered: bool, has_body: bool, tried: int, retries: int, others: bool
) -> AfterTimeout:
    """``tried``: backends that failed this request, the one that timed out included;
    ``others``: whether an up backend not tried yet exists. (``retry.decide``, as an enum.)"""
    facts = Facts(answered=answered, has_body=has_body, tried=tried, retries=retries, others=others)
    action = decide(Failure.RESPONSE_TIMEOUT, facts)
    if isinstance(action, Retry):
        return AfterTimeout.RETRY
    return AfterTimeout.ANSWER if isinstance(action, Answer) else AfterTimeout.CLOSE


def body_stalled(now: float, since: float, body_timeout: float) -> bool:
    """Whether a request body whose byte count last changed at ``since`` timed out."""
    return now - since >= body_timeout


def next_body_check(now: float, since: float, body_timeout: float) -> float:
    """When to look at a streaming request body again (never later than its deadline)."""
    return min(now + body_timeout / BODY_CHECKS, since + body_timeout)
