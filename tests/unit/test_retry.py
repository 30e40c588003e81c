"""retry.decide, the one rule every path follows after a failed attempt (pure)."""

from __future__ import annotations

import errno
import itertools

import pytest

from lbproxy.core.retry import (
    CLOSE_CLIENT,
    RETRY,
    Answer,
    Facts,
    Failure,
    Retry,
    blame,
    decide,
    from_errno,
    from_exception,
)

F = Failure
CONNECT = [F.CONNECT_REFUSED, F.CONNECT_TIMEOUT, F.CONNECT_ERROR]
NO_ANSWER = [F.RESET, F.CLOSED, F.BAD_RESPONSE]

ROWS = [
    # failure, facts, expected
    (F.LOCAL_RESOURCES, Facts(), Answer(503, "out of local resources")),
    (F.NO_BACKEND, Facts(tried=0), Answer(503, "no healthy backend")),
    (F.NO_BACKEND, Facts(tried=2), Answer(502, "backend unreachable")),
    *[(f, Facts(tried=1, retries=2), RETRY) for f in CONNECT],
    *[(f, Facts(tried=3, retries=2), Answer(502, "backend unreachable")) for f in CONNECT],
    *[(f, Facts(tried=1, retries=2, has_body=True), RETRY) for f in CONNECT],
    *[(f, Facts(tried=1, retries=2), RETRY) for f in NO_ANSWER],
    *[
        (f, Facts(tried=1, retries=2, has_body=True), Answer(502, "backend closed the connection"))
        for f in NO_ANSWER
    ],
    *[
        (f, Facts(tried=3, retries=2), Answer(502, "backend closed the connection"))
        for f in NO_ANSWER
    ],
    *[(f, Facts(answered=True, tried=1), CLOSE_CLIENT) for f in NO_ANSWER],
    (F.RESPONSE_TIMEOUT, Facts(tried=1, retries=2), RETRY),
    (
        F.RESPONSE_TIMEOUT,
        Facts(tried=1, retries=2, others=False),
        Answer(504, "backend sent no response in time"),
    ),
    (
        F.RESPONSE_TIMEOUT,
        Facts(tried=1, retries=2, has_body=True),
        Answer(504, "backend sent no response in time"),
    ),
    (
        F.RESPONSE_TIMEOUT,
        Facts(tried=3, retries=2),
        Answer(504, "backend sent no response in time"),
    ),
    (F.RESPONSE_TIMEOUT, Facts(answered=True, tried=1), CLOSE_CLIENT),
    (F.REUSED_CONNECTION_CLOSED, Facts(reused=True), Retry(same=True)),
    (
        F.REUSED_CONNECTION_CLOSED,
        Facts(reused=True, has_body=True, replayable=True),
        Retry(same=True, replay=True),
    ),
    (
        F.REUSED_CONNECTION_CLOSED,
        Facts(reused=True, has_body=True),
        Answer(502, "reused backend connection closed (request not resendable)"),
    ),
]


@pytest.mark.parametrize(("failure", "facts", "expected"), ROWS)
def test_decide_table(failure: Failure, facts: Facts, expected: object) -> None:
    assert decide(failure, facts) == expected


def test_every_failure_kind_has_rows() -> None:
    assert {row[0] for row in ROWS} == set(Failure)


@pytest.mark.parametrize("failure", list(Failure))
def test_decide_invariants_over_every_fact_combination(failure: Failure) -> None:
    for answered, reused, has_body, replayable, others, tried, retries in itertools.product(
        *[(False, True)] * 5, range(4), range(3)
    ):
        facts = Facts(answered, reused, has_body, replayable, tried, retries, others)
        action = decide(failure, facts)
        if failure is F.LOCAL_RESOURCES:
            assert action == Answer(503, "out of local resources")
        elif failure is F.NO_BACKEND:
            assert isinstance(action, Answer) and action.status == (502 if tried else 503)
        elif answered:  # bytes reached the client: never a retry, never a second answer
            assert action is CLOSE_CLIENT
        elif isinstance(action, Retry):
            if failure is F.REUSED_CONNECTION_CLOSED:  # once, same backend, body at hand
                assert action.same and (not has_body or replayable)
            else:  # within the attempts, and a consumed body is never sent elsewhere
                assert not action.same and tried <= retries
                assert failure in CONNECT or not has_body
        else:
            assert isinstance(action, Answer) and action.status in (502, 504)


def test_errnos_are_typed_once() -> None:
    assert from_errno(errno.ECONNREFUSED) is F.CONNECT_REFUSED
    assert from_errno(errno.ETIMEDOUT) is F.CONNECT_TIMEOUT
    assert from_errno(errno.EHOSTUNREACH) is F.CONNECT_ERROR
    assert from_errno(errno.EMFILE) is F.LOCAL_RESOURCES
    assert from_errno(errno.EPERM) is F.CONNECT_ERROR
    # on an established connection (the engine's report): reset, or closed for 0
    assert from_errno(errno.ECONNRESET, connecting=False) is F.RESET
    assert from_errno(0, connecting=False) is F.CLOSED
    assert from_errno(errno.ENOMEM, connecting=False) is F.RESET
    assert from_exception(TimeoutError()) is F.CONNECT_TIMEOUT
    assert from_exception(ConnectionRefusedError(errno.ECONNREFUSED, "x")) is F.CONNECT_REFUSED
    assert from_exception(OSError(errno.ENFILE, "x")) is F.LOCAL_RESOURCES


def test_metric_reasons_and_blame() -> None:
    # the reason label of lbproxy_upstream_errors_total (tests and deploy/ rules use them)
    assert [f.value for f in CONNECT + NO_ANSWER] == [
        "connect_refused",
        "connect_timeout",
        "connect_error",
        "reset",
        "closed",
        "bad_response",
    ]
    assert F.RESPONSE_TIMEOUT.value == "response_timeout"
    assert F.LOCAL_RESOURCES.value == "local_resources"
    assert blame(F.RESET, answered=False) == "reset before answering"
    assert blame(F.CONNECT_REFUSED, answered=False) == "connect_refused"
    assert blame(F.RESPONSE_TIMEOUT, answered=True) == "no response in time"
    assert blame(F.CLOSED, answered=True) is None
    assert blame(F.LOCAL_RESOURCES, answered=False) is None
    assert blame(F.REUSED_CONNECTION_CLOSED, answered=False) is None
