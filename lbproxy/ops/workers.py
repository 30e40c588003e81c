"""A worker's end of `serve --workers N`: the control socket to its supervisor.

The supervisor (lbproxy/ops/supervisor.py) starts each worker with one end of a Unix socket
pair (``--control-fd``). Down it come the pool snapshots (membership, states, columns of
the shared count table; see pool_sync.py) and reload orders; up go the worker's counters
once a second and its passive failures. When the socket reaches EOF the supervisor is
gone, and the worker drains and exits rather than run unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

from lbproxy.ops.pool_sync import Entry, decode, encode

log = logging.getLogger("lbproxy.ops.workers")

MAX_LINE = 64 * 1024 * 1024  # a snapshot of MAX_BACKENDS backends fits easily


def _ignore(*_args: object) -> None:
    return None


class WorkerLink:
    """Reads the supervisor's messages and sends this worker's reports."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.version = 0
        self.on_snapshot: Callable[[Mapping[str, list[Entry]]], None] = _ignore
        self.on_reload: Callable[[str], None] = _ignore
        self.on_lost: Callable[[], None] = _ignore
        self.on_handover: Callable[[], None] = _ignore
        self.handover_fd = -1  # to this worker's successor (lbproxy upgrade)
        self.adopt_fd = -1  # from this worker's predecessor (a new generation's worker)
        self._loaded = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = socket.socket(fileno=self._fd)
        reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
        self._task = asyncio.get_running_loop().create_task(self._read(reader))

    async def wait_snapshot(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._loaded.wait()
        return self._loaded.is_set()

    def send(self, message: Mapping[str, Any]) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode(message))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                self._handle(decode(line))
        except (OSError, ValueError) as exc:
            log.error("control socket to the supervisor failed: %s", exc)
        log.warning("the supervisor is gone: draining and exiting")
        self.on_lost()

    def _handle(self, message: dict[str, Any] | None) -> None:
        kind = None if message is None else message.get("t")
        if message is None:
            log.error("malformed message from the supervisor ignored")
        elif kind == "snapshot":
            version = int(message.get("version", 0))
            if version >= self.version:  # the same one again: asked for (resync)
                self.on_snapshot(message.get("pools", {}))
                self.version = version
                self._loaded.set()
        elif kind == "reload":
            self.on_reload(str(message.get("path", "")))
        elif kind == "handover":
            self.on_handover()
