"""What a failed attempt at a backend leads to: one pure rule for every path.

Sans-IO (httpcore's "decide, then do the I/O"): failures are typed where they enter
(``from_errno``, ``from_exception``: one errno table for the Python path and the native
engine's reported errnos), and ``decide`` turns a failure and the facts of the request
into one action — the Python connect loop (connect.py), the upstream that died before
or during its answer, the missed response deadline, the reused keep-alive connection
closed under a request, and the native upgrade path all call it. The metric reason of
each kind (``Failure.value``) is the ``reason`` label of ``lbproxy_upstream_errors_total``.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

# lbproxy itself is out of something (file descriptors, buffers): not the backend's fault
LOCAL_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Failure(enum.Enum):
    """Why an attempt at a backend failed; the value is the metric reason."""

    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECT_ERROR = "connect_error"  # unreachable, or any other connect error
    LOCAL_RESOURCES = "local_resources"  # lbproxy's own limits (EMFILE, ENOMEM, ...)
    RESET = "reset"  # connected, then reset (before or during the answer)
    CLOSED = "closed"  # connected, then closed (before or during the answer)
    BAD_RESPONSE = "bad_response"  # a malformed or oversize response head / body
    RESPONSE_TIMEOUT = "response_timeout"  # no response head within response_timeout
    REUSED_CONNECTION_CLOSED = "reused_closed"  # a kept-alive connection gone before a word
    NO_BACKEND = "no_backend"  # the pick found no (untried) backend up


CONNECT_FAILURES = frozenset(
    {Failure.CONNECT_REFUSED, Failure.CONNECT_TIMEOUT, Failure.CONNECT_ERROR}
)
NO_ANSWER = frozenset({Failure.RESET, Failure.CLOSED, Failure.BAD_RESPONSE})
UNCOUNTED = frozenset({Failure.REUSED_CONNECTION_CLOSED, Failure.NO_BACKEND})

# the errnos of a connect (Python's OSError or the engine's report), once
ERRNO_FAILURES = {
    errno.ECONNREFUSED: Failure.CONNECT_REFUSED,
    errno.ETIMEDOUT: Failure.CONNECT_TIMEOUT,
    errno.ENETUNREACH: Failure.CONNECT_ERROR,
    errno.EHOSTUNREACH: Failure.CONNECT_ERROR,
    errno.EADDRNOTAVAIL: Failure.CONNECT_ERROR,
    **{code: Failure.LOCAL_RESOURCES for code in LOCAL_ERRORS},
}


def from_errno(code: int, *, connecting: bool = True) -> Failure:
    """The failure an errno stands for (``connecting``: the connect had not completed;
    otherwise an error on an established connection: a reset, or a close when 0)."""
    failure = ERRNO_FAILURES.get(code)
    if failure is not None and (connecting or failure is not Failure.LOCAL_RESOURCES):
        return failure
    if connecting:
        return Failure.CONNECT_ERROR
    return Failure.RESET if code else Failure.CLOSED


def from_exception(exc: BaseException) -> Failure:
    """The failure a ``create_connection`` exception stands for."""
    if isinstance(exc, TimeoutError):
        return Failure.CONNECT_TIMEOUT
    if isinstance(exc, OSError) and exc.errno is not None:
        return from_errno(exc.errno)
    return Failure.CONNECT_ERROR


def blame(failure: Failure, answered: bool) -> str | None:
    """The passive-health reason charged to the backend (None: not its fault, or the
    answer had begun); a blamed backend is also not tried again for this request."""
    if failure is Failure.RESPONSE_TIMEOUT:
        return "no response in time"  # (its head is late even after a 100 Continue)
    if answered or failure is Failure.LOCAL_RESOURCES or failure in UNCOUNTED:
        return None
    if failure in NO_ANSWER:
        return f"{failure.value} before answering"
    return str(failure.value)


@dataclass(frozen=True, slots=True)
class Retry:
    """Send the request again: ``same`` on the same backend (a fresh connection), else
    on another; ``replay``: with the request body held while it was sent."""

    same: bool = False
    replay: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer the client with this error status (and close)."""

    status: int
    detail: str


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Bytes of the response reached the client already: just close it."""


Action = Retry | Answer | CloseClient
CLOSE_CLIENT = CloseClient()
RETRY = Retry()


@dataclass(frozen=True, slots=True)
class Facts:
    """What ``decide`` needs to know about the request whose attempt failed.

    ``tried``: backends blamed for this request so far (the failing one included);
    ``others``: whether an up backend not tried yet exists (only the response
    deadline looks: the other paths let the next pick find out)."""

    answered: bool = False
    reused: bool = False
    has_body: bool = False
    replayable: bool = False
    tried: int = 0
    retries: int = 0
    others: bool = True


def decide(failure: Failure, facts: Facts) -> Action:
    """What to do after ``failure``: retry, answer with an error status, or close."""
    if failure is Failure.LOCAL_RESOURCES:
        return Answer(503, "out of local resources")  # any backend would fail the same
    if failure is Failure.NO_BACKEND:
        if facts.tried:
            return Answer(502, "backend unreachable")
        return Answer(503, "no healthy backend")
    if facts.answered:
        return CLOSE_CLIENT
    if failure is Failure.REUSED_CONNECTION_CLOSED:
        if not facts.has_body or facts.replayable:
            return Retry(same=True, replay=facts.has_body)
        return Answer(502, "reused backend connection closed (request not resendable)")
    can_retry = facts.tried <= facts.retries
    if failure in CONNECT_FAILURES:  # nothing was sent: any request may go elsewhere
        return RETRY if can_retry else Answer(502, "backend unreachable")
    if failure is Failure.RESPONSE_TIMEOUT:
        if can_retry and not facts.has_body and facts.others:
            return RETRY
        return Answer(504, "backend sent no response in time")
    # reset / closed / bad response before any answer: a body may have been consumed
    if can_retry and not facts.has_body:
        return RETRY
    return Answer(502, "backend closed the connection")
