"""SPEC 11, once for every engine: client frames followed (messages, split headers), the
message size and rate limits (1009 / 1008 to the client, 1001 to the backend, the refused
frame never forwarded), proxy pings and dead peers, the message metrics, and limits off
forwarding the bytes unchanged. Each test runs on the native engine and the Python tunnel,
on asyncio and uvloop (rig.KINDS); the rules themselves are ws_rules' (test_ws_rules.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import struct

import pytest

from lbproxy.config.types import WebsocketConfig
from lbproxy.core.ws_rules import PING_FRAME
from lbproxy.proxy import native_tunnel, tunnel
from lbproxy.proxy.splice import engine_class
from tests.contract.rig import KINDS, Rig, contract

pytestmark = pytest.mark.timeout(60)

LIMITS = WebsocketConfig(max_message=65536, max_messages_per_second=100000, burst=100000)
ROOMY = WebsocketConfig(max_message=1 << 20, max_messages_per_second=100000, burst=100000)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name.startswith("native") and engine_class() is None:
        pytest.skip("the native engine is not built (test_splice.py fails for that)")
    return name


def ws(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame (masked as a client's when ``mask`` is given)."""
    n = len(payload)
    first = bytes(((0x80 if fin else 0) | opcode,))
    bit = 0x80 if mask else 0
    if n < 126:
        head = first + bytes((bit | n,))
    elif n < 65536:
        head = first + bytes((bit | 126,)) + struct.pack("!H", n)
    else:
        head = first + bytes((bit | 127,)) + struct.pack("!Q", n)
    if mask:
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


def client(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return ws(opcode, payload, fin=fin, mask=b"\x01\x02\x03\x04")


def frames(stream: bytes) -> list[tuple[bool, int, bytes]]:
    """(fin, opcode, unmasked payload) of every whole frame in ``stream``."""
    out = []
    pos = 0
    while pos + 2 <= len(stream):
        b0, b1 = stream[pos], stream[pos + 1]
        size, head = b1 & 0x7F, 2
        if size == 126:
            size, head = struct.unpack("!H", stream[pos + 2 : pos + 4])[0], 4
        elif size == 127:
            size, head = struct.unpack("!Q", stream[pos + 2 : pos + 10])[0], 10
        mask = stream[pos + head : pos + head + 4] if b1 & 0x80 else b""
        start = pos + head + len(mask)
        payload = stream[start : start + size]
        assert len(payload) == size, "a frame cut short"
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        out.append((bool(b0 & 0x80), b0 & 0x0F, payload))
        pos = start + size
    assert pos == len(stream), "bytes after the last whole frame"
    return out


def close_code(frame: tuple[bool, int, bytes]) -> int:
    assert frame[1] == 0x8, frame
    code: int = struct.unpack("!H", frame[2][:2])[0]
    return code


async def refused(r: Rig, code: int) -> tuple[bytes, bytes]:
    """The client gets close ``code``, the backend 1001 then EOF: (client, backend) streams."""
    to_backend = await r.read_to_eof(r.backend, timeout=10)
    backend_frames = frames(to_backend)
    assert close_code(backend_frames[-1]) == 1001
    got = bytearray()
    while not got or frames_or_none(bytes(got)) is None or frames(bytes(got))[-1][1] != 0x8:
        chunk = await r.read(r.client, 1, timeout=10)
        assert chunk, f"EOF before the close frame: {bytes(got)!r}"
        got += chunk
    assert close_code(frames(bytes(got))[-1]) == code
    await r.send(r.client, client(0x8, struct.pack("!H", code)))  # the client's reply
    assert await r.read_to_eof(r.client) == b""  # ... and lbproxy closes
    r.backend.close()  # (the backend's side was sent a FIN: it closes too)
    await r.until(r.finished)
    return bytes(got), to_backend


def frames_or_none(stream: bytes) -> list[tuple[bool, int, bytes]] | None:
    try:
        return frames(stream)
    except (AssertionError, struct.error):
        return None


def test_a_message_over_max_message_is_refused_before_its_payload(kind: str) -> None:
    first = client(0x2, b"fine" * 100)
    big = client(0x2, os.urandom(100_000))

    async def body(r: Rig) -> None:
        await r.send(r.client, first)
        assert await r.read(r.backend, len(first)) == first
        await r.send(r.client, big[:40_000])  # the header decides: nothing of it goes on
        _, to_backend = await refused(r, 1009)
        assert [f[1] for f in frames(to_backend)] == [0x8]  # only the 1001, no payload byte
        assert r.ctx.stats.ws_closes[("p", "message_too_big")] == 1
        assert r.ctx.stats.ws_messages[("p", "b", "in")] == 1

    contract(kind, body, websocket=LIMITS)


def test_peers_that_do_not_close_after_a_refusal_are_closed_after_the_grace(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tunnel, "GRACE", 0.3)  # (the Python tunnel's)
    monkeypatch.setattr(native_tunnel, "GRACE", 0.3)  # (the engine's tunnels')

    async def body(r: Rig) -> None:
        sweeper = asyncio.create_task(r.sweeping())  # (it hands the engine's refusals over)
        try:
            await r.send(r.client, client(0x2, b"x" * 70_000))
            await r.until(r.finished, timeout=5)  # neither peer answered nor closed
            assert await r.read_to_eof(r.client) != b""  # (the 1009 went out)
            assert r.link.reason == "message too big (1009)"
        finally:
            sweeper.cancel()

    contract(kind, body, websocket=LIMITS)


def test_fragments_adding_up_past_max_message_are_refused(kind: str) -> None:
    parts = [
        client(0x2, b"a" * 30_000, fin=False),
        client(0x9, b"ping between fragments"),  # control frames are legal in between
        client(0x0, b"b" * 30_000, fin=False),
    ]
    over = client(0x0, b"c" * 30_000)

    async def body(r: Rig) -> None:
        sent = b"".join(parts)
        await r.send(r.client, sent + over)
        _, to_backend = await refused(r, 1009)
        assert to_backend.startswith(sent)
        assert frames(to_backend[len(sent) :])[0][1] == 0x8  # then the 1001, not "c"
        assert r.ctx.stats.ws_messages.get(("p", "b", "in"), 0) == 0  # (never completed)

    contract(kind, body, websocket=LIMITS)


def test_a_burst_over_the_message_rate_is_closed_1008(kind: str) -> None:
    policy = WebsocketConfig(max_messages_per_second=50, burst=20)
    burst = b"".join(client(0x1, f"message {i}".encode()) for i in range(400))

    async def body(r: Rig) -> None:
        await r.send(r.client, burst)
        _, to_backend = await refused(r, 1008)
        data = [f for f in frames(to_backend) if f[1] == 0x1]
        assert 20 <= len(data) <= 22  # the burst, and what the rate let through meanwhile
        assert [f[2] for f in data] == [f"message {i}".encode() for i in range(len(data))]
        assert r.ctx.stats.ws_closes[("p", "message_rate")] == 1

    contract(kind, body, websocket=policy)


@pytest.mark.parametrize("limits", [True, False], ids=["limits", "no-limits"])
def test_frame_headers_split_at_every_byte_offset(kind: str, limits: bool) -> None:
    """Every way to cut the header of a 7-, 16- and 64-bit length frame (and its first
    payload byte) across two reads: the backend gets the stream unchanged, all counted."""
    sample = [client(0x1, b"x" * 5), client(0x2, b"y" * 300), client(0x2, b"z" * 70_000)]

    async def body(r: Rig) -> None:
        sent = bytearray()
        count = 0
        for frame in sample:
            header = frame.index(b"\x01\x02\x03\x04") + 4
            for cut in range(1, header + 2):
                await r.send(r.client, frame[:cut])
                await asyncio.sleep(0.002)  # (a separate read, most likely)
                await r.send(r.client, frame[cut:])
                sent += frame
                count += 1
        assert await r.read(r.backend, len(sent), timeout=20) == bytes(sent)
        assert r.link.message_counts() == (count, 0)

    contract(kind, body, websocket=ROOMY if limits else None)


def test_limits_off_forwards_every_byte_unchanged(kind: str) -> None:
    rnd = random.Random(7)
    sizes = [0, 1, 125, 126, 127, 65535, 65536, 70000, 3]
    up = b"".join(client(rnd.choice([0x1, 0x2, 0x9, 0xA]), os.urandom(n)) for n in sizes)
    down = b"".join(ws(rnd.choice([0x1, 0x2, 0x9]), os.urandom(n)) for n in sizes)

    async def body(r: Rig) -> None:
        for stream, src, dst in ((up, r.client, r.backend), (down, r.backend, r.client)):
            pos = 0
            while pos < len(stream):
                step = rnd.randrange(1, 3000)
                await r.send(src, stream[pos : pos + step])
                pos += step
            assert await r.read(dst, len(stream), timeout=15) == stream

    contract(kind, body)


def test_message_metrics_equal_the_messages_sent(kind: str) -> None:
    up = [client(0x1, b"hello"), client(0x2, b"x" * 70_000), client(0x9, b"ping")]
    up += [client(0x1, b"part", fin=False), client(0xA, b""), client(0x0, b"end")]
    down = [ws(0x1, b"hi"), ws(0x2, b"y" * 200, fin=False), ws(0x0, b"z"), ws(0x9, b"")]
    down += [ws(0x2, b"w" * 100)] * 5

    async def body(r: Rig) -> None:
        await r.send(r.client, b"".join(up))
        await r.send(r.backend, b"".join(down))
        assert len(await r.read(r.backend, sum(map(len, up)))) == sum(map(len, up))
        assert len(await r.read(r.client, sum(map(len, down)))) == sum(map(len, down))
        r.link.flush_bytes()  # (the 1 s sampler): live counts
        assert r.ctx.stats.ws_messages[("p", "b", "in")] == 3
        assert r.ctx.stats.ws_messages[("p", "b", "out")] == 7
        r.client.close()
        await r.read_to_eof(r.backend)
        r.backend.close()
        await r.until(r.finished)
        assert r.ctx.stats.ws_messages[("p", "b", "in")] == 3  # (not counted twice)
        assert r.ctx.stats.ws_messages[("p", "b", "out")] == 7
        assert dict(r.ctx.stats.ws_closes) == {("p", "client"): 1}

    contract(kind, body, websocket=ROOMY)


PINGS = WebsocketConfig(ping_interval=0.4, ping_timeout=0.6)


def test_a_silent_client_is_pinged_then_closed_and_the_backend_gets_1001(kind: str) -> None:
    async def body(r: Rig) -> None:
        sweeper = asyncio.create_task(r.sweeping())
        try:
            start = r.loop.time()
            assert await r.read(r.client, len(PING_FRAME), timeout=5) == PING_FRAME
            assert r.loop.time() - start < 0.4 + 0.3  # ping_interval + sweep granularity
            assert await r.read_to_eof(r.client, timeout=5) == b""  # closed as dead
            assert r.loop.time() - start >= 0.4 + 0.6 - 0.1
            to_backend = await r.read_to_eof(r.backend, timeout=5)
            assert [close_code(f) for f in frames(to_backend)] == [1001]
            r.backend.close()
            await r.until(r.finished)
            assert r.ctx.stats.ws_closes[("p", "dead_peer")] == 1
            assert r.link.reason.startswith("dead peer")
        finally:
            sweeper.cancel()

    contract(kind, body, websocket=PINGS)


def test_a_client_that_answers_pings_stays_open_and_its_pongs_reach_the_backend(
    kind: str,
) -> None:
    async def body(r: Rig) -> None:
        sweeper = asyncio.create_task(r.sweeping())
        pong = client(0xA, b"")
        try:
            end = r.loop.time() + 5 * 0.4
            pongs = 0
            while r.loop.time() < end:
                assert await r.read(r.client, 2, timeout=2) == PING_FRAME
                await r.send(r.client, pong)
                pongs += 1
            assert pongs >= 3
            assert await r.read(r.backend, len(pong) * pongs) == pong * pongs  # unsolicited
            assert not r.finished()
            await r.send(r.backend, ws(0x1, b"still here"))
            assert await r.read(r.client, 12) == ws(0x1, b"still here")
        finally:
            sweeper.cancel()

    contract(kind, body, websocket=PINGS)


def test_a_ping_is_never_injected_inside_a_frame_in_flight(kind: str) -> None:
    big = ws(0x2, os.urandom(1 << 20))  # 1 MiB, sent over more than a ping_interval
    policy = WebsocketConfig(ping_interval=0.1, ping_timeout=30)

    async def body(r: Rig) -> None:
        sweeper = asyncio.create_task(r.sweeping(0.02))
        got = bytearray()

        async def reader() -> None:
            while len(got) < len(big) + len(PING_FRAME):
                got.extend(await r.loop.sock_recv(r.client, 65536))

        reading = asyncio.create_task(reader())
        try:
            for pos in range(0, len(big), 64 * 1024):  # 16 chunks over ~0.5 s
                await r.send(r.backend, big[pos : pos + 64 * 1024])
                await asyncio.sleep(0.03)
            await asyncio.wait_for(reading, 10)
            seen = frames(bytes(got))  # every byte is part of a whole frame, in order
            assert [f[1] for f in seen] == [0x2, 0x9]  # the ping waited for the frame's end
            assert seen[0][2] == big[10:]
        finally:
            sweeper.cancel()
            reading.cancel()

    contract(kind, body, websocket=policy)
