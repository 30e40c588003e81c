"""The HTTP client in-process, no sockets: a fake client transport, fake backends."""

from __future__ import annotations

import asyncio
import time

import pytest

from lbproxy.core.http1 import MAX_HEAD
from lbproxy.core.states import (
    CLIENT_TRANSITIONS,
    UPSTREAM_TRANSITIONS,
    ClientState,
    IllegalTransition,
    UpstreamState,
    check,
)
from tests.unit.fakes import Rig

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


async def until(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def test_get_forwarded_and_answered() -> None:
    rig = Rig({9001: "accept"})
    client, out = rig.client()
    client.data_received(GET)
    await until(lambda: rig.loop.upstreams and rig.loop.upstreams[0].out)
    sent = bytes(rig.loop.upstreams[0].out)
    assert sent.startswith(b"GET / HTTP/1.1\r\n")
    assert b"X-Forwarded-For: 127.0.0.1\r\n" in sent and sent.endswith(b"\r\n\r\n")
    rig.loop.upstreams[0].protocol.data_received(OK)
    assert bytes(out.out) == OK
    assert not out.closed
    assert rig.stats.requests[("p", "b9001")] == 1


async def test_keepalive_reuses_the_upstream_connection() -> None:
    rig = Rig({9001: "accept"})
    client, out = rig.client()
    for n in (1, 2):
        client.data_received(GET)
        await until(lambda n=n: rig.loop.upstreams and rig.loop.upstreams[0].out.count(b"GET") == n)
        rig.loop.upstreams[0].protocol.data_received(OK)
    assert rig.loop.attempts == [9001]  # one connection, two requests
    assert bytes(out.out) == OK + OK


async def test_a_keepalive_request_reuses_the_finished_exchange_afresh() -> None:
    rig = Rig({9001: "accept"})
    client, out = rig.client()
    client.data_received(GET)
    await until(lambda: rig.loop.upstreams and rig.loop.upstreams[0].out)
    first = client.exchange
    assert first is not None and not first.reused  # (a new connection to the backend)
    rig.loop.upstreams[0].protocol.data_received(OK)
    assert client.exchange is None and first.status == 200
    client.data_received(GET)  # the fast lane, on the kept-alive upstream connection
    assert client.exchange is first  # no new object per keep-alive request ...
    assert first.status == 0 and first.reused and first.tried == frozenset()  # ... afresh
    rig.loop.upstreams[0].protocol.data_received(OK)
    assert bytes(out.out) == OK + OK


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"BAD\r\n\r\n", b"400"), (b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10), b"431")],
)
async def test_bad_heads_get_their_status(data: bytes, status: bytes) -> None:
    rig = Rig({9001: "accept"})
    client, out = rig.client()
    client.data_received(data)
    assert out.out.startswith(b"HTTP/1.1 " + status)
    assert rig.loop.attempts == []
    assert rig.stats.rejected[("web", status.decode())] == 1


async def test_slow_head_gets_408() -> None:
    rig = Rig({9001: "accept"}, listener={"handshake_timeout": 0.05})
    client, out = rig.client()
    due = rig.ctx.deadlines[client]  # (armed at the accept: no timer per connection)
    client.data_received(b"GET / HTTP/1.1\r\n")
    assert rig.ctx.deadlines[client] == due  # (more bytes of the head do not extend it)
    assert not out.out
    client.deadline_passed(due)  # (what the listener's sweep does once it is due)
    assert out.out.startswith(b"HTTP/1.1 408")
    assert client not in rig.ctx.deadlines


async def test_head_deadline_is_gone_once_the_head_is_in() -> None:
    rig = Rig({9001: "accept"}, listener={"handshake_timeout": 0.05})
    client, out = rig.client()
    due = rig.ctx.deadlines[client]
    client.data_received(GET)
    client.deadline_passed(due + 1.0)  # (the entry left behind, or the response's)
    assert not out.out.startswith(b"HTTP/1.1 408")


async def test_no_backend_up_gets_503() -> None:
    rig = Rig({})
    client, out = rig.client()
    client.data_received(GET)
    assert out.out.startswith(b"HTTP/1.1 503")


async def test_refused_connect_is_retried_elsewhere() -> None:
    rig = Rig({9001: "refuse", 9002: "accept"})
    client, out = rig.client()
    client.data_received(GET)
    await until(lambda: rig.loop.upstreams and rig.loop.upstreams[0].out)
    assert sorted(rig.loop.attempts) == [9001, 9002]
    rig.loop.upstreams[0].protocol.data_received(OK)
    assert bytes(out.out) == OK
    assert rig.stats.upstream_errors[("p", "b9001", "connect_refused")] == 1


async def test_every_connect_refused_gets_502() -> None:
    rig = Rig({9001: "refuse", 9002: "refuse", 9003: "refuse"}, retries=1)
    client, out = rig.client()
    client.data_received(GET)
    await until(lambda: out.out)
    assert out.out.startswith(b"HTTP/1.1 502")
    assert len(rig.loop.attempts) == 2  # retries=1: two attempts, then 502
    errors = sum(v for k, v in rig.stats.upstream_errors.items() if k[2] == "connect_refused")
    assert errors == 2


async def test_response_timeout_gets_504() -> None:
    rig = Rig({9001: "accept"}, response_timeout=0.01)
    client, out = rig.client()
    client.data_received(GET)
    await until(lambda: rig.loop.upstreams and rig.loop.upstreams[0].out)
    due = rig.ctx.deadlines[client]
    client.deadline_passed(due)  # (what the listener's sweep does once it is due)
    assert out.out.startswith(b"HTTP/1.1 504")
    assert rig.loop.upstreams[0].closed
    assert rig.stats.upstream_errors[("p", "b9001", "response_timeout")] == 1


async def test_reused_connection_closed_is_resent_on_a_fresh_one() -> None:
    rig = Rig({9001: "accept"})
    client, out = rig.client()
    client.data_received(GET)
    await until(lambda: rig.loop.upstreams and rig.loop.upstreams[0].out)
    first = rig.loop.upstreams[0]
    first.protocol.data_received(OK)
    client.data_received(GET)  # the fast lane: on the kept-alive connection
    assert first.out.count(b"GET") == 2
    first.protocol.connection_lost(None)  # closed under the request, before a word
    await until(lambda: len(rig.loop.upstreams) == 2 and rig.loop.upstreams[1].out)
    rig.loop.upstreams[1].protocol.data_received(OK)
    assert bytes(out.out) == OK + OK
    assert not rig.stats.upstream_errors  # not the backend's failure
    assert rig.pool.backends["b9001"].state is rig.pool.backends["b9001"].state.UP


async def test_an_illegal_transition_raises() -> None:
    rig = Rig({9001: "accept"})
    client, _out = rig.client()
    client.data_received(b"BAD\r\n\r\n")  # rejected: DONE
    assert client.state is ClientState.DONE
    with pytest.raises(IllegalTransition, match="DONE -> HEAD"):
        client.advance(ClientState.HEAD)  # a closed connection never reads another head
    assert client.state is ClientState.DONE


@pytest.mark.parametrize(
    ("table", "old", "new"),
    [
        (CLIENT_TRANSITIONS, ClientState.DONE, ClientState.FORWARD),
        (CLIENT_TRANSITIONS, ClientState.CONNECTING, ClientState.HEAD),
        (UPSTREAM_TRANSITIONS, UpstreamState.BODY, UpstreamState.HEAD),
        (UPSTREAM_TRANSITIONS, UpstreamState.IDLE, UpstreamState.BODY),
    ],
)
def test_transition_tables_refuse_illegal_pairs(table, old, new) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(IllegalTransition):
        check(table, old, new)


def test_transition_tables_cover_every_state() -> None:
    assert set(CLIENT_TRANSITIONS) == set(ClientState)
    assert set(UPSTREAM_TRANSITIONS) == set(UpstreamState)
    check(CLIENT_TRANSITIONS, ClientState.FORWARD, ClientState.HEAD)  # keep-alive: allowed
    check(UPSTREAM_TRANSITIONS, UpstreamState.HEAD, UpstreamState.BODY)
