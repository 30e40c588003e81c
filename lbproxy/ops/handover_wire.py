"""The Unix socket between a worker and its successor during ``lbproxy upgrade``.

One message is a JSON document plus the file descriptors it speaks of (``SCM_RIGHTS``):
an 8-byte header (document length, descriptor count) sent together with the descriptors,
then the document. Bytes inside the document (the engine's held-back output, a frame
header in progress) travel as ``{"b64": ...}``. Blocking calls: the callers run them in
an executor thread, so the event loop keeps forwarding meanwhile.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
from typing import Any

HEADER = struct.Struct("!II")
MAX_FDS = 250  # (the kernel's SCM_MAX_FD is 253)
MAX_DOCUMENT = 256 * 1024 * 1024


class WireError(Exception):
    """The channel broke or carried something that is not a message."""


SCALAR = (int, float, str, bool, type(None))  # (left as they are: no call per field)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {k: v if type(v) in SCALAR else _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [v if type(v) in SCALAR else _plain(v) for v in value]
    return value


def _rich(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("b64"), str):
            return base64.b64decode(value["b64"])
        return {k: v if type(v) in SCALAR else _rich(v) for k, v in value.items()}
    if isinstance(value, list):
        return [v if type(v) in SCALAR else _rich(v) for v in value]
    return value


def send_message(sock: socket.socket, document: dict[str, Any], fds: list[int]) -> None:
    """Send one message (the descriptors are duplicated by the kernel: close yours after)."""
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} descriptors in one message (at most {MAX_FDS})")
    body = json.dumps(_plain(document), separators=(",", ":")).encode()
    try:
        socket.send_fds(sock, [HEADER.pack(len(body), len(fds))], fds)
        sock.sendall(body)
    except OSError as exc:
        raise WireError(f"hand-over channel: {exc}") from exc


def send_paced(sock: socket.socket, document: dict[str, Any], fds: list[int], acks: int) -> None:
    """Send one message, then wait for ``acks`` one-byte acknowledgements (the receiver
    sends one per message handled): what is in flight, hence frozen, stays bounded."""
    send_message(sock, document, fds)
    try:
        if acks and len(_recv_exactly(sock, acks)) != acks:
            raise WireError("hand-over channel: short acknowledgement")
    except OSError as exc:
        raise WireError(f"hand-over channel: {exc}") from exc


def acknowledge(sock: socket.socket) -> None:
    """One message handled (see send_paced); a sender already gone is no error here."""
    with contextlib.suppress(OSError):
        sock.send(b"\x01", socket.MSG_DONTWAIT)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(n - len(chunks), 1 << 20))
        if not chunk:
            raise WireError("hand-over channel closed mid-message")
        chunks += chunk
    return bytes(chunks)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and its descriptors (now the caller's); None at EOF."""
    fds: list[int] = []
    try:
        head, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, MAX_FDS)
        if not head:
            return None
        if len(head) < HEADER.size:
            head += _recv_exactly(sock, HEADER.size - len(head))
        size, count = HEADER.unpack(head)
        if size > MAX_DOCUMENT or count != len(fds):
            raise WireError(f"bad message header ({size} bytes, {count} fds, got {len(fds)})")
        document = json.loads(_recv_exactly(sock, size))
    except (OSError, ValueError) as exc:
        for fd in fds:
            os.close(fd)
        raise WireError(f"hand-over channel: {exc}") from exc
    if not isinstance(document, dict):
        raise WireError("hand-over message is not an object")
    return _rich(document), list(fds)
