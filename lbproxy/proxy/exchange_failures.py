"""http mode (L7), one request's failures: what the Exchange (exchange.py) does when its
backend fails (closed, reset, a bad or late response): account for it, then ``retry.decide``
says retry, answer (502 / 503 / 504) or close. A part of ``Exchange``, in its own module."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lbproxy.core.pool import Backend, BackendState
from lbproxy.core.retry import Answer, Facts, Failure, Retry, decide
from lbproxy.core.states import ClientState
from lbproxy.proxy.deadlines import untried

if TYPE_CHECKING:
    from lbproxy.core.http1 import ChunkedTracker, LengthTracker, RequestHead
    from lbproxy.proxy.context import ListenerContext
    from lbproxy.proxy.http_upstream import Upstream
    from lbproxy.proxy.native_upgrade import NativeUpgrade
    from lbproxy.proxy.types import ConnectionSide

FORWARD = ClientState.FORWARD


class ExchangeFailures:
    """The failure half of ``exchange.Exchange`` (which holds the slots, and the methods
    declared here)."""

    __slots__ = ()

    if TYPE_CHECKING:
        ctx: ListenerContext
        conn: ConnectionSide
        head: RequestHead
        backend: Backend | None
        upstream: Upstream | None
        native: NativeUpgrade | None
        tracker: ChunkedTracker | LengthTracker | None
        held: bytearray | None
        tried: frozenset[str]
        reused: bool
        mark_out: int

        def end(self) -> None: ...

        def drop_upstream(self) -> None: ...

        def count_failure(self, backend: Backend, failure: Failure, answered: bool) -> None: ...

        def _retry(
            self, first: Backend | None, avoid: frozenset[str], replay: bool = False
        ) -> None: ...

    def upstream_failed(self, got_response: bool, failure: Failure) -> None:
        """The backend connection died before the response completed."""
        backend = self.backend
        if backend is None:
            self.end()
            if got_response:
                self.conn.close_now()
            else:
                self.conn.reject(502, "backend closed the connection")
            return
        if not got_response and self.reused:
            # A kept-alive connection closed under us before any answer: not the backend's
            # failure. Resend once on a fresh connection when the whole request is at hand.
            failure = Failure.REUSED_CONNECTION_CLOSED
        self._failure(backend, failure, got_response)

    def response_timeout(self) -> None:
        """The response deadline passed (the connection's sweep entry)."""
        native = self.native
        if native is not None and native.pending:
            native.deadline_passed()
        elif self.conn.state is FORWARD and self.backend is not None and self.upstream is not None:
            answered = self.conn.nbytes_out > self.mark_out
            self._failure(self.backend, Failure.RESPONSE_TIMEOUT, answered)

    def _failure(self, backend: Backend, failure: Failure, answered: bool) -> None:
        """Account for ``failure`` of the request's backend, then act (retry.decide)."""
        pool = self.ctx.pool
        self.count_failure(backend, failure, answered)
        has_body = self.head.body.kind != "none"
        others = failure is not Failure.RESPONSE_TIMEOUT or untried(
            ((b.id, b.state is BackendState.UP) for b in pool.backends.values()), self.tried
        )
        replayable = has_body and self.tracker is None and self.held is not None
        tried, retries = len(self.tried), pool.config.retries
        facts = Facts(answered, self.reused, has_body, replayable, tried, retries, others)
        action = decide(failure, facts)
        if failure is Failure.RESPONSE_TIMEOUT:
            self.drop_upstream()
        else:
            self.end()
        if isinstance(action, Retry):
            if action.same:
                self._retry(backend, frozenset(), action.replay)
            else:
                self._retry(None, self.tried)
        elif isinstance(action, Answer):
            self.conn.reject(action.status, action.detail)
        else:
            self.conn.close_now()
