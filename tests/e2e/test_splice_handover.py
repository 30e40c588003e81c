"""The engine's hand-over (``lbproxy upgrade``): export a tunnel from one engine, import it
into another, on real sockets without an event loop. Nothing may be lost, duplicated or
reordered: bytes the first engine held unsent, the frame position, half-closes, counts.
(The sanitizer build runs these too: tests/e2e/test_splice_sanitized.py.)"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Iterator

import pytest

from lbproxy.core.tunnel_rules import GOING_AWAY_FRAME, engine_setup
from tests.e2e.test_splice import Engine, pump_until, tcp_pair

pytestmark = pytest.mark.timeout(30)


class Pair:
    """Two engines (the old generation's and the new one's) and one tunnel between apps."""

    def __init__(self, ws: bool) -> None:
        assert Engine is not None
        rules, frame = engine_setup()
        self.finished: list[tuple[object, str, int, int]] = []
        self.old = Engine(lambda *a: self.finished.append(a), rules=rules, close_frame=frame)
        self.new = Engine(lambda *a: self.finished.append(a), rules=rules, close_frame=frame)
        self.client, client_proxy = tcp_pair()
        backend_proxy, self.backend = tcp_pair()
        client_proxy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # (backs up early)
        client_proxy.setblocking(False)
        backend_proxy.setblocking(False)
        cfd, bfd = os.dup(client_proxy.fileno()), os.dup(backend_proxy.fileno())
        client_proxy.close()
        backend_proxy.close()
        self.owner = object()
        self.slot = self.old.add(self.owner, cfd, bfd, ws, b"", 0, False)

    def move(self) -> dict[str, object]:
        """Export from the old engine; import into the new one (as another process would,
        with fresh descriptors of the same sockets)."""
        cfd, bfd, state = self.old.export(self.slot, self.owner)
        assert len(self.old) == 0
        ncfd, nbfd = (os.dup(fd) if fd >= 0 else -1 for fd in (cfd, bfd))
        for fd in (cfd, bfd):
            if fd >= 0:
                os.close(fd)
        self.owner = object()
        self.slot = self.new.import_tunnel(self.owner, ncfd, nbfd, state)
        return state

    def close(self) -> None:
        self.client.close()
        self.backend.close()


@pytest.fixture
def pair() -> Iterator[type[Pair]]:
    if Engine is None:
        pytest.skip("engine not built")
    made: list[Pair] = []

    class Made(Pair):
        def __init__(self, ws: bool = False) -> None:
            super().__init__(ws)
            made.append(self)

    yield Made
    for p in made:
        p.close()


def read_exactly(engine: object, sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    sock.setblocking(False)

    def enough() -> bool:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return False
        got.extend(chunk)
        return len(got) >= n or not chunk

    pump_until(engine, enough, 15.0)
    return bytes(got)


def transfer(engine: object, src: socket.socket, data: bytes, dst: socket.socket, n: int) -> bytes:
    """Send ``data`` from ``src`` while the engine forwards and ``dst`` reads ``n`` bytes."""
    src.setblocking(False)
    dst.setblocking(False)
    got = bytearray()
    view = memoryview(data)

    def done() -> bool:
        nonlocal view
        if view:
            with contextlib.suppress(BlockingIOError):
                view = view[src.send(view[:65536]) :]
        with contextlib.suppress(BlockingIOError):
            got.extend(dst.recv(1 << 20))
        return len(got) >= n

    deadline = time.monotonic() + 20.0
    while not done():
        assert time.monotonic() < deadline, f"{len(got)} of {n} bytes arrived"
        select.select([engine.fileno(), dst], [], [], 0.01)  # type: ignore[attr-defined]
        engine.pump()  # type: ignore[attr-defined]
    return bytes(got)


def test_bytes_held_unsent_move_first_and_in_order(pair) -> None:
    """A slow client: the old engine holds bytes for it; they arrive before the rest."""
    p = pair()
    p.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = bytes(i % 251 for i in range(640 << 10))
    p.backend.setblocking(False)
    sent = 0
    for _ in range(20):  # until the client's socket and the engine are backed up
        try:
            sent += p.backend.send(data[sent : sent + 65536])
        except BlockingIOError:
            if sent > (1 << 20):
                break
        select.select([p.old.fileno()], [], [], 0.01)
        p.old.pump()
    state = p.move()
    held = len(state["client"]["pend"])  # type: ignore[index]
    assert held > 0, "the old engine held nothing unsent: the test did not test that"
    got = transfer(p.new, p.backend, data[sent:], p.client, len(data))
    assert got == data
    assert p.new.counts(p.slot, p.owner) == (0, len(data))


def test_a_frame_in_flight_finishes_before_the_1001(pair) -> None:
    """The backend->client frame cursor moves: a drain after the move waits for the frame."""
    p = pair(ws=True)
    payload = b"x" * 1000
    frame = bytes([0x82, 126]) + len(payload).to_bytes(2, "big") + payload
    p.backend.sendall(frame[:300])
    assert read_exactly(p.old, p.client, 300) == frame[:300]
    state = p.move()
    assert state["skip"] == len(frame) - 300
    p.new.go_away(p.slot, p.owner)
    p.backend.sendall(frame[300:] + b"\x81\x02hi")  # the rest, then a frame never forwarded
    got = read_exactly(p.new, p.client, len(frame) - 300 + len(GOING_AWAY_FRAME))
    assert got == frame[300:] + GOING_AWAY_FRAME


def test_a_half_close_moves(pair) -> None:
    """The client has sent its FIN before the move: the backend can still answer."""
    p = pair()
    p.client.sendall(b"request")
    p.client.shutdown(socket.SHUT_WR)
    assert read_exactly(p.old, p.backend, 7) == b"request"
    select.select([p.old.fileno()], [], [], 0.1)
    p.old.pump()
    state = p.move()
    assert state["client"]["eof"] == 1  # type: ignore[index]
    p.backend.sendall(b"answer")
    assert read_exactly(p.new, p.client, 6) == b"answer"
    p.backend.close()
    pump_until(p.new, lambda: bool(p.finished))
    assert p.finished[0][0] is p.owner
    assert p.finished[0][2:4] == (7, 6)  # the counts went on from where they were


def test_export_checks_the_owner_and_the_state_is_checked(pair) -> None:
    p = pair()
    with pytest.raises(KeyError):
        p.old.export(p.slot, object())
    cfd, bfd, state = p.old.export(p.slot, p.owner)
    try:
        bad = dict(state, client=dict(state["client"], mode=9))
        with pytest.raises(ValueError):
            p.new.import_tunnel(object(), cfd, bfd, bad)
        assert len(p.new) == 0  # refused: the fds are still the caller's
        os.fstat(cfd)
        slot = p.new.import_tunnel(p.owner, cfd, bfd, state)
    except BaseException:
        os.close(cfd)
        os.close(bfd)
        raise
    p.client.sendall(b"ping")
    assert read_exactly(p.new, p.backend, 4) == b"ping"
    assert p.new.counts(slot, p.owner) == (4, 0)


def test_every_field_goes_both_ways(pair) -> None:
    """Each exported field is imported as it was (values set here, none left at zero): the
    field list of export and import is the same (issue 15's fields included)."""
    p = pair(ws=True)
    cfd, bfd, state = p.old.export(p.slot, p.owner)
    ints = [k for k, v in state.items() if isinstance(v, int)]
    assert {"skip", "msgs_in", "msgs_out", "tat", "heard_at", "cskip"} <= set(ints)
    for n, key in enumerate(ints):
        state[key] = {"ws": 1, "going_away": 0, "skip": 0, "reason_side": 1}.get(key, n + 2)
    state["chb"] = b"\x81"
    for side in ("client", "backend"):
        state[side] = dict(state[side], nread=12, hup=1, shut=0, eof=0, mode=0, failed=0)
    owner = object()
    slot = p.new.import_tunnel(owner, cfd, bfd, state)
    again = p.new.export(slot, owner)
    for fd in again[:2]:
        os.close(fd)
    assert again[2] == state
