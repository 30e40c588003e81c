"""ws_rules and the Python scanner (wsscan) in memory; the [pools.NAME.websocket] table.

The same rules on the wire, for both engines: tests/contract/test_ws_policy_contract.py.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.config.load import parse_config
from lbproxy.config.types import WebsocketConfig
from lbproxy.core.tunnel_rules import GOING_AWAY_FRAME
from lbproxy.core.ws_rules import (
    CONTINUES,
    DATA,
    OFF,
    OPCODES,
    STARTS,
    CloseKind,
    Tick,
    Verdict,
    WsPolicy,
    close_reason,
    closes,
    engine_ws_setup,
    frame_verdict,
    gcra,
    ping_timeouts,
    sweep_action,
    ws_policy,
)
from lbproxy.core.wsscan import ClientFrames
from lbproxy.errors import ConfigError
from tests.contract.test_ws_policy_contract import client, frames


def test_opcode_table() -> None:
    assert OPCODES[0] == CONTINUES | DATA
    assert OPCODES[1] == OPCODES[2] == STARTS | DATA
    assert all(OPCODES[op] == 0 for op in range(3, 16))  # control and reserved: size only


def test_gcra_lets_a_burst_through_then_the_rate() -> None:
    tat, allowed = 0.0, 0
    for _ in range(100):  # all at once
        ok, tat = gcra(tat, 10.0, 0.02, 20 * 0.02)
        allowed += ok
    assert allowed == 20
    assert gcra(tat, 10.0 + 0.021, 0.02, 0.4)[0]  # one more after one emission interval


@pytest.mark.parametrize("now", [0.5, 10.0, 1234.5678, 98765.4321, 3.7e6])
def test_gcra_burst_is_exact_at_any_clock_reading(now: float) -> None:
    """Sums of float emissions round: the burst-th message at once must still pass."""
    tat, allowed = 0.0, 0
    for _ in range(100):
        ok, tat = gcra(tat, now, 0.02, 20 * 0.02)
        allowed += ok
    assert allowed == 20


def test_policy_from_config_and_burst_default() -> None:
    policy = ws_policy(WebsocketConfig(max_messages_per_second=50, burst=0))
    assert policy.emission == pytest.approx(0.02) and policy.tolerance == pytest.approx(1.0)
    assert policy.limits and not policy.pings
    assert ws_policy(WebsocketConfig()) == OFF and not OFF.limits
    assert ping_timeouts(WsPolicy(ping_interval=5)) == (5, 10.0) and ping_timeouts(OFF) == ()


def test_frame_verdict_sizes_fragments_and_control_frames() -> None:
    policy = WsPolicy(max_message=100)
    assert frame_verdict(OPCODES[2], 100, 0, 0.0, 0.0, policy)[:2] == (Verdict.PASS, 100)
    assert frame_verdict(OPCODES[2], 101, 0, 0.0, 0.0, policy)[0] is Verdict.MESSAGE_TOO_BIG
    verdict, length, _ = frame_verdict(OPCODES[0], 40, 60, 0.0, 0.0, policy)
    assert (verdict, length) == (Verdict.PASS, 100)
    assert frame_verdict(OPCODES[0], 41, 60, 0.0, 0.0, policy)[0] is Verdict.MESSAGE_TOO_BIG
    assert frame_verdict(OPCODES[9], 5, 99, 0.0, 0.0, policy)[:2] == (Verdict.PASS, 99)
    rate = WsPolicy(emission=1.0, tolerance=1.0)
    verdict, _, tat = frame_verdict(OPCODES[1], 1, 0, 0.0, 5.0, rate)
    assert verdict is Verdict.PASS and tat == 6.0
    assert frame_verdict(OPCODES[0], 1, 0, tat, 5.0, rate)[0] is Verdict.PASS  # (not a new one)
    assert frame_verdict(OPCODES[2], 1, 0, tat, 5.0, rate)[0] is Verdict.MESSAGE_RATE


def test_sweep_action() -> None:
    policy = WsPolicy(ping_interval=30, ping_timeout=10)
    assert sweep_action(29.9, False, policy) is Tick.NOTHING
    assert sweep_action(30, False, policy) is Tick.PING
    assert sweep_action(35, True, policy) is Tick.NOTHING
    assert sweep_action(40, True, policy) is Tick.DEAD
    assert sweep_action(1e9, False, OFF) is Tick.NOTHING


def test_closes_and_metric_reasons() -> None:
    table = closes(b"abcd")
    assert table[CloseKind.DRAIN] == (GOING_AWAY_FRAME, b"")
    for kind, code in ((CloseKind.MESSAGE_TOO_BIG, 1009), (CloseKind.MESSAGE_RATE, 1008)):
        (to_client,) = frames(table[kind][0])
        (to_backend,) = frames(table[kind][1])
        assert struct.unpack("!H", to_client[2][:2]) == (code,)
        assert struct.unpack("!H", to_backend[2][:2]) == (1001,)
        assert table[kind][1][1] & 0x80  # masked, as a client's frame must be
    assert table[CloseKind.DEAD_PEER][0] == b""
    assert close_reason(CloseKind.DEAD_PEER, 1, "client closed") == "dead_peer"
    assert close_reason(CloseKind.NONE, 0, "backend error: x") == "backend"
    assert close_reason(CloseKind.NONE, 0, "client closed") == "client"
    assert close_reason(CloseKind.NONE, 1, "backend closed") == "client"  # (the close frame)
    assert close_reason(CloseKind.NONE, 2, "client closed") == "backend"
    assert close_reason(CloseKind.NONE, 0, "drained (1001 going away)") == "drain"
    assert close_reason(CloseKind.DRAIN, 2, "backend closed") == "drain"
    assert close_reason(CloseKind.NONE, 0, "idle for 10s") is None


def test_engine_setup_is_the_same_rules_as_data() -> None:
    params, opcodes, flat, ping = engine_ws_setup(WsPolicy(30, 10, 65536, 0.02, 0.4), b"abcd")
    assert params == (30 * 10**9, 10 * 10**9, 65536, 20_000_000, 400_000_000)
    assert opcodes == OPCODES and len(flat) == 2 * len(CloseKind) and ping == b"\x89\x00"
    assert flat[2 * CloseKind.MESSAGE_TOO_BIG] == closes(b"abcd")[CloseKind.MESSAGE_TOO_BIG][0]


STREAM = [client(0x1, b"x" * 5), client(0x2, b"y" * 300), client(0x2, b"z" * 70_000)]
STREAM += [client(0x2, b"a", fin=False), client(0x9, b"p"), client(0x0, b"b")]


def _inside_headers() -> set[int]:
    """Offsets of STREAM that fall strictly inside a frame header."""
    inside, pos = set(), 0
    for frame in STREAM:
        header = frame.index(b"\x01\x02\x03\x04") + 4
        inside |= {pos + k for k in range(1, header)}
        pos += len(frame)
    return inside


@pytest.mark.parametrize("limits", [True, False])
def test_scanner_every_split_of_every_header(limits: bool) -> None:
    policy = WsPolicy(max_message=1 << 20) if limits else OFF
    whole = b"".join(STREAM)
    inside = _inside_headers()
    for cut in sorted(inside | {c + 1 for c in inside} | {len(whole) - 1}):
        scan = ClientFrames(policy)
        first, v1 = scan.feed(whole[:cut])
        second, v2 = scan.feed(whole[cut:])
        assert (v1, v2) == (Verdict.PASS, Verdict.PASS)
        assert first + second == whole and scan.messages == 4 and scan.clean
        if limits:  # a partial header is held back, never forwarded
            assert len(first) not in inside
        else:
            assert first == whole[:cut]


@settings(max_examples=80, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=71_000), max_size=10))
def test_scanner_any_chunking_forwards_everything_with_limits(cuts: list[int]) -> None:
    whole = b"".join(STREAM)
    scan = ClientFrames(WsPolicy(max_message=1 << 20, emission=1e-9, tolerance=1.0))
    out, start = bytearray(), 0
    for point in sorted({c % len(whole) for c in cuts} | {len(whole)}):
        forwarded, verdict = scan.feed(whole[start:point], 1.0)
        assert verdict is Verdict.PASS
        out += forwarded
        start = point
    assert bytes(out) == whole and scan.messages == 4


def test_scanner_refuses_at_the_header_and_forwards_what_precedes() -> None:
    scan = ClientFrames(WsPolicy(max_message=1000))
    ok, big = client(0x1, b"hi"), client(0x2, b"x" * 2000)
    out, verdict = scan.feed(ok + big[:3])  # the big header is still incomplete: held
    assert (out, verdict) == (ok, Verdict.PASS)
    out, verdict = scan.feed(big[3:50])
    assert (out, verdict) == (b"", Verdict.MESSAGE_TOO_BIG)


def config_of(table: dict[str, Any]) -> WebsocketConfig:
    data: dict[str, Any] = {
        "listeners": {"public": {"bind": "127.0.0.1:8080", "pool": "chat"}},
        "pools": {"chat": {"backends": [{"address": "127.0.0.1:9001"}], "websocket": table}},
    }
    return parse_config(data, "conf.toml").pools["chat"].websocket


def test_config_table_read_and_defaults() -> None:
    assert config_of({}) == WebsocketConfig()
    read = config_of(
        {
            "ping_interval": 30,
            "ping_timeout": 5,
            "max_message": 65536,
            "max_messages_per_second": 2.5,
            "burst": 10,
        }
    )
    assert read == WebsocketConfig(30.0, 5.0, 65536, 2.5, 10)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("ping_interval", -1, "must be a non-negative number, got -1"),
        ("ping_timeout", 0, "must be a positive number, got 0"),
        ("max_message", 1.5, "must be an integer >= 0, got 1.5"),
        ("max_message", -1, "must be an integer >= 0, got -1"),
        ("max_messages_per_second", "fast", "must be a non-negative number, got 'fast'"),
        ("burst", -2, "must be an integer >= 0, got -2"),
        ("colour", "red", "unknown key"),
    ],
)
def test_config_problems_name_file_and_key(key: str, value: object, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_of({key: value})
    assert info.value.problems == [f"conf.toml: pools.chat.websocket.{key}: {problem}"]
