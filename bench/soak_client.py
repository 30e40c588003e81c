"""A chat client that follows the protocol (README
"The reference chat backend"), and the run's tally.

Following the protocol means: after every disconnect it reconnects and joins with ``since`` (the
newest id it has) and the ``epoch`` that id was read in; a send that was not acknowledged (its
own ``msg`` back, or the ``duplicate`` answer) is sent again with the same ``client_msg_id``
(sends are pipelined, up to ``window`` in flight);
a message is kept once per (from, client_msg_id); a ping every ``ping_interval`` with 2 missed
answers is a dead connection, and so is a handshake (connect + ``joined``) slower than
``handshake_timeout``.

What it counts, per client: ``duplicated``, a (from, client_msg_id) delivered again under
another id (stored twice) or the same id delivered twice; ``reordered``, an id not greater than
the one before; ``gaps``, ``history_gap`` events. ``lost`` is computed at the end against what
the senders had acknowledged (:func:`tally`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, WebSocketException

RETRYABLE = (OSError, TimeoutError, WebSocketException, ConnectionClosed)


class Dead(Exception):
    """The connection stopped answering (pings or handshake)."""


@dataclass
class ClientConfig:
    url: str  # ws://host:port (the /chat path and user are added)
    room: str
    rate: float  # sends per second
    ping_interval: float = 0.5
    handshake_timeout: float = 2.0
    ack_timeout: float = 10.0  # a send not acknowledged within this is sent again (pings
    # find dead connections much sooner; this is for a send lost without a disconnect)
    window: int = 50  # sends in flight at most


@dataclass
class Counts:
    acked: set[str] = field(default_factory=set)  # own client_msg_ids the server stored
    got: dict[tuple[str, str], int] = field(default_factory=dict)  # (from, cmid) -> id
    latencies: list[float] = field(default_factory=list)
    duplicated: int = 0
    reordered: int = 0
    gaps: list[str] = field(default_factory=list)
    reconnects: int = 0
    resends: int = 0
    unavailable: int = 0


class SoakClient:
    def __init__(self, user: str, config: ClientConfig) -> None:
        self.user = user
        self.config = config
        self.counts = Counts()
        self.last_id: int | None = None
        self.epoch: str | None = None
        self.sent = 0  # messages made so far (their client_msg_ids are user-0 .. user-{sent-1})
        # sends in flight: client_msg_id -> (text, when it was last sent, monotonic)
        self.pending: dict[str, tuple[str, float]] = {}
        self._retry: list[str] = []  # answered "unavailable" / "rate_limited": send again
        self.sending = True
        self.ids: set[int] = set()
        self._wake = asyncio.Event()
        self._missed = 0

    # ---- the connection loop -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected (reconnecting) until ``stop`` is set."""
        first = True
        while not stop.is_set():
            if not first:
                self.counts.reconnects += 1
            first = False
            try:
                await self._connection(stop)
            except (*RETRYABLE, Dead):
                pass
            if not stop.is_set():
                await asyncio.sleep(0.05)

    async def _connection(self, stop: asyncio.Event) -> None:
        cfg = self.config
        ws = await asyncio.wait_for(
            websockets.connect(
                f"{cfg.url}/chat?user={self.user}", compression=None, close_timeout=0.5
            ),
            cfg.handshake_timeout,
        )
        try:
            join: dict[str, Any] = {"op": "join", "room": cfg.room, "since": self.last_id or 0}
            if self.last_id is not None and self.epoch is not None:
                join["epoch"] = self.epoch
            await ws.send(json.dumps(join))
            await asyncio.wait_for(self._until_joined(ws), cfg.handshake_timeout)
            self._missed = 0
            tasks = [
                asyncio.create_task(self._reader(ws)),
                asyncio.create_task(self._pinger(ws)),
                asyncio.create_task(self._sender(ws)),
                asyncio.create_task(stop.wait()),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            ws.transport.abort()  # never wait for a close handshake with a dead peer

    async def _until_joined(self, ws: websockets.ClientConnection) -> None:
        while True:
            event = json.loads(await ws.recv())
            if event.get("op") == "joined":
                self.epoch = event["epoch"]
                return
            self._event(event)

    async def _reader(self, ws: websockets.ClientConnection) -> None:
        async for raw in ws:
            self._missed = 0
            self._event(json.loads(raw))

    async def _pinger(self, ws: websockets.ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.config.ping_interval)
            if self._missed >= 2:
                raise Dead("no answer to 2 pings")
            self._missed += 1
            await ws.send('{"op":"ping"}')

    async def _sender(self, ws: websockets.ClientConnection) -> None:
        """New sends on schedule (up to ``window`` in flight), and every unacknowledged one
        again: all of them on a new connection, then each after an error or ``ack_timeout``."""
        cfg = self.config
        started = time.monotonic() - self.sent / cfg.rate  # the schedule restarts on reconnect
        again = list(self.pending)
        while True:
            now = time.monotonic()
            again += [c for c in self._retry if c in self.pending]
            again += [c for c, (_, at) in self.pending.items() if now - at > cfg.ack_timeout]
            self._retry.clear()
            for cmid in dict.fromkeys(again):
                self.counts.resends += 1
                await self._send(ws, cmid, self.pending[cmid][0])
            again = []
            due = started + self.sent / cfg.rate
            if self.sending and now >= due and len(self.pending) < cfg.window:
                cmid = f"{self.user}-{self.sent}"
                self.sent += 1
                await self._send(ws, cmid, f"{cmid} {time.time():.6f}")
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                wait = max(0.005, min(0.5, due - now)) if self.sending else 0.5
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _send(self, ws: websockets.ClientConnection, cmid: str, text: str) -> None:
        self.pending[cmid] = (text, time.monotonic())
        send = {"op": "send", "room": self.config.room, "text": text, "client_msg_id": cmid}
        await ws.send(json.dumps(send))

    # ---- events ------------------------------------------------------------------------------

    def _event(self, event: dict[str, Any]) -> None:
        op = event.get("op")
        if op == "msg":
            self._msg(event)
        elif op == "history_gap":
            self.counts.gaps.append(str(event.get("reason")))
            self.epoch = event.get("epoch", self.epoch)
        elif op == "error" and event.get("client_msg_id") in self.pending:
            self.counts.unavailable += event.get("code") == "unavailable"
            delay = float(event.get("retry_after", 0.1))
            asyncio.get_running_loop().call_later(delay, self._again, event["client_msg_id"])

    def _msg(self, m: dict[str, Any]) -> None:
        if m["from"] == self.user and m["client_msg_id"] in self.pending:
            self.counts.acked.add(m["client_msg_id"])
            del self.pending[m["client_msg_id"]]
            self._wake.set()
        if m.get("duplicate"):
            return  # the answer to a re-sent send: not a delivery
        key = (m["from"], m["client_msg_id"])
        msg_id = int(m["id"])
        if key in self.counts.got or msg_id in self.ids:
            self.counts.duplicated += 1
            return
        if self.last_id is not None and msg_id <= self.last_id:
            self.counts.reordered += 1
        self.last_id = msg_id if self.last_id is None else max(self.last_id, msg_id)
        self.ids.add(msg_id)
        self.counts.got[key] = msg_id
        with contextlib.suppress(ValueError, IndexError):
            self.counts.latencies.append(time.time() - float(m["text"].split(" ", 1)[1]))

    def _again(self, cmid: str) -> None:
        self._retry.append(cmid)
        self._wake.set()

    def done_sending(self) -> bool:
        return not self.sending and not self.pending


@dataclass(frozen=True)
class Tally:
    clients: int
    stored: int  # distinct messages acknowledged to their senders
    expected: int  # (client, message) pairs: every member gets every message of its room
    delivered: int
    lost: int
    duplicated: int
    reordered: int
    gaps: int
    reconnects: int
    resends: int
    unavailable: int
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float


def missing(clients: Sequence[SoakClient]) -> int:
    """(client, message) pairs acknowledged to a sender in the client's room, not received."""
    stored: dict[str, set[tuple[str, str]]] = {}
    for c in clients:
        stored.setdefault(c.config.room, set()).update((c.user, m) for m in c.counts.acked)
    return sum(len(stored[c.config.room] - c.counts.got.keys()) for c in clients)


def tally(clients: Sequence[SoakClient]) -> Tally:
    rooms: dict[str, int] = {}
    for c in clients:
        rooms[c.config.room] = rooms.get(c.config.room, 0) + len(c.counts.acked)
    members: dict[str, int] = {}
    for c in clients:
        members[c.config.room] = members.get(c.config.room, 0) + 1
    lat = sorted(x for c in clients for x in c.counts.latencies)

    def pct(q: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else 0.0

    return Tally(
        clients=len(clients),
        stored=sum(rooms.values()),
        expected=sum(rooms[r] * members[r] for r in rooms),
        delivered=sum(len(c.counts.got) for c in clients),
        lost=missing(clients),
        duplicated=sum(c.counts.duplicated for c in clients),
        reordered=sum(c.counts.reordered for c in clients),
        gaps=sum(len(c.counts.gaps) for c in clients),
        reconnects=sum(c.counts.reconnects for c in clients),
        resends=sum(c.counts.resends for c in clients),
        unavailable=sum(c.counts.unavailable for c in clients),
        latency_p50_ms=pct(0.5),
        latency_p99_ms=pct(0.99),
        latency_max_ms=round(1000 * lat[-1], 1) if lat else 0.0,
    )
