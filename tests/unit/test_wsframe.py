"""FrameCursor follows websocket frame boundaries across any split of the stream."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.core.proxy_protocol import V2_SIGNATURE, proxy_header
from lbproxy.core.wsframe import FrameCursor, close_frame


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    n = len(payload)
    first = bytes((0x80 | opcode,))
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head = first + bytes((mask_bit | n,))
    elif n < 65536:
        head = first + bytes((mask_bit | 126,)) + struct.pack("!H", n)
    else:
        head = first + bytes((mask_bit | 127,)) + struct.pack("!Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + payload
    return head + payload


sizes = st.lists(
    st.sampled_from([0, 1, 5, 125, 126, 127, 300, 65535, 65536, 70000]), min_size=1, max_size=6
)


@settings(max_examples=60, deadline=None)
@given(
    sizes=sizes,
    cuts=st.lists(st.integers(min_value=1, max_value=90000), max_size=8),
    masked=st.booleans(),
)
def test_boundaries_follow_any_split(sizes: list[int], cuts: list[int], masked: bool) -> None:
    frames = [frame(0x2, b"x" * n, b"abcd" if masked else None) for n in sizes]
    stream = b"".join(frames)
    boundaries = set()
    pos = 0
    for f in frames:
        pos += len(f)
        boundaries.add(pos)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    cursor = FrameCursor()
    start = 0
    for point in points:
        chunk = stream[start:point]
        # to_boundary agrees with the true next boundary (or says it is not in this chunk)
        nxt = min((b for b in boundaries | {0} if b >= start), default=None)
        k = cursor.to_boundary(chunk)
        if nxt is not None and nxt - start <= len(chunk) and (start in boundaries or start == 0):
            assert k == 0
        elif nxt is not None and nxt - start <= len(chunk):
            assert k == nxt - start
        else:
            assert k == -1
        cursor.feed(chunk)
        assert cursor.at_boundary == (point in boundaries or point == 0)
        start = point
    assert cursor.at_boundary


def test_close_frames_are_seen_and_built() -> None:
    cursor = FrameCursor()
    cursor.feed(frame(0x1, b"hello"))
    assert not cursor.saw_close
    cursor.feed(close_frame(1000))
    assert cursor.saw_close
    assert close_frame(1001) == b"\x88\x02\x03\xe9"
    masked = close_frame(1001, b"", mask=b"\x01\x02\x03\x04")
    assert (
        masked[:2] == b"\x88\x82"
        and bytes(b ^ m for b, m in zip(masked[6:], b"\x01\x02", strict=True)) == b"\x03\xe9"
    )


def test_proxy_protocol_v1_and_v2() -> None:
    v1 = proxy_header("v1", ("127.0.0.2", 5555), ("127.0.0.1", 8080))
    assert v1 == b"PROXY TCP4 127.0.0.2 127.0.0.1 5555 8080\r\n"
    v1_6 = proxy_header("v1", ("::1", 5555), ("::1", 8080))
    assert v1_6 == b"PROXY TCP6 ::1 ::1 5555 8080\r\n"
    v2 = proxy_header("v2", ("127.0.0.2", 5555), ("127.0.0.1", 8080))
    assert v2.startswith(V2_SIGNATURE)
    assert v2[12] == 0x21 and v2[13] == 0x11
    assert struct.unpack("!H", v2[14:16])[0] == 12
    assert v2[16:20] == bytes([127, 0, 0, 2]) and v2[20:24] == bytes([127, 0, 0, 1])
    assert struct.unpack("!HH", v2[24:28]) == (5555, 8080)
    mixed = proxy_header("v2", ("127.0.0.2", 1), ("::1", 2))
    assert mixed[13] == 0x21 and len(mixed) == 16 + 36
