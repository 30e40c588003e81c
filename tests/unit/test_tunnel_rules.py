"""The tunnel rules, sans-IO (tunnel_rules): modes and their transitions, the go-away rule,
the close frame, and the table the native engine is given at start."""

from __future__ import annotations

import pytest

from lbproxy.core.tunnel_rules import (
    AFTER,
    GOING_AWAY_FRAME,
    TRANSITIONS,
    WHERE_TRANSITIONS,
    GoAway,
    IllegalTransition,
    Mode,
    Side,
    Where,
    check,
    engine_rules,
    engine_setup,
    go_away,
)


def test_a_side_moves_only_along_the_table() -> None:
    for now in Mode:
        for to in Mode:
            side = Side(now)
            if (now, to) in TRANSITIONS:
                side.move(to)
                assert side.mode is to
            else:
                with pytest.raises(IllegalTransition, match=f"{now.name} -> {to.name}"):
                    side.move(to)
                assert side.mode is now
    assert Side().mode is Mode.FORWARD


def test_closed_is_final_and_parting_is_one_way() -> None:
    assert not any(now is Mode.CLOSED for now, _ in TRANSITIONS)
    assert (Mode.DROP, Mode.FORWARD) not in TRANSITIONS
    assert (Mode.CLOSE_ON_DATA, Mode.DROP) not in TRANSITIONS


def test_the_go_away_rule() -> None:
    assert go_away(ws=False, saw_close=False, at_boundary=False) is GoAway.PART
    assert go_away(ws=True, saw_close=True, at_boundary=False) is GoAway.PART
    assert go_away(ws=True, saw_close=False, at_boundary=True) is GoAway.CLOSE_FRAME
    assert go_away(ws=True, saw_close=False, at_boundary=False) is GoAway.WAIT_BOUNDARY
    assert AFTER[GoAway.CLOSE_FRAME] == (Mode.CLOSE_ON_DATA, Mode.DROP)
    assert AFTER[GoAway.PART] == (Mode.DROP, Mode.DROP)
    for modes in AFTER.values():  # every action leaves FORWARD legally
        for mode in modes:
            assert (Mode.FORWARD, mode) in TRANSITIONS


def test_the_engine_table_is_the_rule() -> None:
    table = engine_rules()
    assert len(table) == 14
    for ws in (False, True):
        for saw_close in (False, True):
            for at_boundary in (False, True):
                index = ws << 2 | saw_close << 1 | at_boundary
                assert table[index] == go_away(ws, saw_close, at_boundary)
    assert table[8 + 2 * GoAway.PART : 10 + 2 * GoAway.PART] == bytes(AFTER[GoAway.PART])
    close = table[8 + 2 * GoAway.CLOSE_FRAME : 10 + 2 * GoAway.CLOSE_FRAME]
    assert close == bytes(AFTER[GoAway.CLOSE_FRAME])
    assert engine_setup() == (table, GOING_AWAY_FRAME)


def test_the_1001_frame() -> None:
    assert GOING_AWAY_FRAME == b"\x88\x14\x03\xe9backend going away"


def test_a_tunnel_moves_to_the_engine_once_and_back_never() -> None:
    allowed = {(Where.PYTHON, Where.NATIVE), (Where.NATIVE, Where.NATIVE_DONE)}
    assert allowed == WHERE_TRANSITIONS
    for now in Where:
        for to in Where:
            if (now, to) not in allowed:
                with pytest.raises(IllegalTransition):
                    check(WHERE_TRANSITIONS, now, to)
