"""The chat's pure parts: message parsing/formatting and the GCRA rate limit (Python and Lua)."""

from __future__ import annotations

import json

import pytest
import redis as redis_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbproxy.backend import chat_protocol as proto
from lbproxy.backend.ratelimit import GCRA_LUA, MICROS, RateLimit, gcra
from lbproxy.backend.store import ChatStore, StoreSettings
from tests.support import RedisServer


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"op":"join","room":"lobby"}', proto.Join("lobby", None)),
        ('{"op":"join","room":"lobby","since":0}', proto.Join("lobby", 0)),
        ('{"op":"join","room":"é x","since":null}', proto.Join("é x", None)),
        ('{"op":"leave","room":"r"}', proto.Leave("r")),
        ('{"op":"presence","room":"r"}', proto.Presence("r")),
        (
            '{"op":"send","room":"r","text":"","client_msg_id":"c"}',
            proto.Send("r", "", "c"),
        ),
    ],
)
def test_parse_valid_commands(raw: str, expected: proto.Command) -> None:
    assert proto.parse_command(raw) == expected


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        ("{", "invalid JSON"),
        ("[1]", "JSON object"),
        ('{"op":"fly"}', "unknown op"),
        ('{"op":"join"}', "room"),
        ('{"op":"join","room":""}', "room"),
        ('{"op":"join","room":"a\\nb"}', "room"),
        ('{"op":"join","room":"' + "x" * 65 + '"}', "room"),
        ('{"op":"join","room":"r","since":"5"}', "since"),
        ('{"op":"join","room":"r","since":true}', "since"),
        ('{"op":"send","room":"r"}', "text"),
        ('{"op":"send","room":"r","text":"t","client_msg_id":7}', "client_msg_id"),
    ],
)
def test_parse_rejects_with_a_detail(raw: str, detail: str) -> None:
    with pytest.raises(proto.BadRequest, match=detail):
        proto.parse_command(raw)


def test_send_without_client_msg_id_gets_a_unique_one() -> None:
    a = proto.parse_command('{"op":"send","room":"r","text":"t"}')
    b = proto.parse_command('{"op":"send","room":"r","text":"t"}')
    assert isinstance(a, proto.Send) and isinstance(b, proto.Send)
    assert a.client_msg_id != b.client_msg_id


@settings(max_examples=80, deadline=None)
@given(
    room=st.text(min_size=1, max_size=64).filter(proto.valid_name),
    user=st.text(min_size=1, max_size=64).filter(proto.valid_name),
    text=st.text(max_size=200),
    cmid=st.text(min_size=1, max_size=20),
    msg_id=st.integers(1, 2**53),
)
def test_message_parts_make_the_spec_msg(
    room: str, user: str, text: str, cmid: str, msg_id: int
) -> None:
    head, tail = proto.message_parts(room, user, proto.Send(room, text, cmid))
    payload = head + str(msg_id) + tail
    assert json.loads(payload) == {
        "op": "msg",
        "room": room,
        "id": msg_id,
        "from": user,
        "text": text,
        "client_msg_id": cmid,
    }
    assert proto.message_id(payload) == msg_id
    assert json.loads(proto.as_duplicate(payload))["duplicate"] is True


def test_error_fields_cannot_override_op_and_code() -> None:
    event = json.loads(proto.error("rate_limited", retry_after=0.5, op="send"))
    assert (event["op"], event["code"], event["retry_after"]) == ("error", "rate_limited", 0.5)


# ---- GCRA ------------------------------------------------------------------------------------


def test_gcra_burst_then_rate() -> None:
    limit = RateLimit(rate=10, burst=3)
    tat = None
    allowed = []
    for _ in range(5):
        ok, tat, retry = gcra(tat, 0, limit)
        allowed.append((ok, retry))
    assert allowed == [(True, 0), (True, 0), (True, 0), (False, 100_000), (False, 100_000)]
    assert gcra(tat, 100_000, limit)[0]  # one interval later: one more


@settings(max_examples=80, deadline=None)
@given(
    rate=st.floats(0.5, 1000),
    burst=st.integers(1, 20),
    gaps=st.lists(st.integers(0, 300_000), min_size=1, max_size=60),
)
def test_gcra_never_exceeds_burst_plus_rate(rate: float, burst: int, gaps: list[int]) -> None:
    limit = RateLimit(rate, burst)
    tat: int | None = None
    now = 0
    accepted: list[int] = []
    for gap in gaps:
        now += gap
        ok, tat, retry = gcra(tat, now, limit)
        if ok:
            accepted.append(now)
        else:
            assert retry > 0
            assert gcra(tat, now + retry, limit)[0]  # retry_after is enough
    for i, start in enumerate(accepted):
        for j in range(i, len(accepted)):
            window = accepted[j] - start
            assert j - i + 1 <= burst + window // limit.interval_us


@pytest.fixture(scope="module")
def redis_module() -> object:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rate=st.floats(0.5, 1000),
    burst=st.integers(1, 10),
    gaps=st.lists(st.integers(0, 2_000_000), min_size=1, max_size=25),
)
def test_gcra_lua_matches_python(
    redis_module: RedisServer, rate: float, burst: int, gaps: list[int]
) -> None:
    """The Lua fragment used by the send script decides exactly like gcra()."""
    script_text = (
        "local NOW = tonumber(ARGV[1]) local INTERVAL = tonumber(ARGV[2]) "
        "local TOLERANCE = tonumber(ARGV[3]) local KEY_RATE = KEYS[1]"
        + GCRA_LUA
        # The fragment gives the key a real-time expiry matching the simulated clock; here the
        # simulated clock does not follow real time, so the key is made persistent in the same
        # atomic script (a PERSIST from the client afterwards raced the expiry on a slow
        # machine) and only the decisions are compared.
        + " redis.call('PERSIST', KEY_RATE) return {'ok', redis.call('GET', KEY_RATE)}"
    )
    client = redis_sync.Redis.from_url(redis_module.url, decode_responses=True)
    try:
        client.delete("rate")
        script = client.register_script(script_text)
        limit = RateLimit(rate, burst)
        base = 1_700_000_000 * MICROS
        tat: int | None = None
        now = base
        for gap in gaps:
            now += gap
            ok, tat, retry = gcra(tat, now, limit)
            kind, value = script(keys=["rate"], args=[now, limit.interval_us, limit.tolerance_us])
            assert (kind == "ok") == ok
            assert int(value) == (tat if ok else retry)
    finally:
        client.close()


def test_keys_are_unambiguous() -> None:
    settings_ = StoreSettings("p", 10, RateLimit(1, 1), 6.0, 60.0, 60.0)
    store = ChatStore(redis_sync.Redis(), settings_)  # type: ignore[arg-type]
    assert store.dedupe_key("a:b", "c", "d") != store.dedupe_key("a", "b:c", "d")
    assert store.stream_key("r") == "p:chat:room:r:stream"
    assert store.channel("r") == "p:chat:room:r"
