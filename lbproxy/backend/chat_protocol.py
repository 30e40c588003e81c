"""The chat's JSON messages (README "The reference chat backend"), parsed and formatted without I/O.

Client to server (text frames, one JSON object each):

- ``{"op":"join","room":R,"since":ID?,"epoch":E?}``: ``since`` absent or null means live
  messages only; ``0`` means all retained history. ``epoch`` is the room epoch ``since`` was
  read in (from ``joined`` or ``history_gap``): when the room is in another epoch now (Redis
  lost its data), the answer is a ``history_gap`` with reason ``epoch``, then the whole history
  of the new epoch.
- ``{"op":"leave","room":R}``
- ``{"op":"send","room":R,"text":T,"client_msg_id":C}``: ``client_msg_id`` is optional (the
  server makes one up, so no dedupe) but a client that retries must send one.
- ``{"op":"presence","room":R}``
- ``{"op":"ping","id":X?}``: answered ``{"op":"pong","id":X}`` at once (an application-level
  liveness check: browsers cannot send websocket pings).

Server to client: ``joined`` (with ``backend``, ``user`` and ``epoch``), ``left``, ``msg``,
``presence``, ``pong``, ``history_gap`` (``{"op":"history_gap","room":R,"reason":W,"epoch":E}``,
W ``trimmed`` with ``oldest``, the oldest id still stored, or ``epoch``: messages the client has
not seen are gone) and ``error`` (``bad_request``, ``rate_limited``, ``unavailable``).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

MAX_NAME = 64  # room and user names: 1..64 characters, no control characters
MAX_CLIENT_MSG_ID = 128


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    since: int | None
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str


@dataclass(frozen=True, slots=True)
class Send:
    room: str
    text: str
    client_msg_id: str


@dataclass(frozen=True, slots=True)
class Presence:
    room: str


@dataclass(frozen=True, slots=True)
class Ping:
    id: str | int | None


Command = Join | Leave | Send | Presence | Ping
MAX_EPOCH = 64
MAX_PING = 1024  # longest text parsed as a possible ping before queueing


class BadRequest(ValueError):
    """A client message that is not valid; ``str(exc)`` is the detail sent back."""


def valid_name(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_NAME
        and all(ord(c) >= 32 and ord(c) != 127 for c in value)
    )


def _room(message: dict[str, Any]) -> str:
    room = message.get("room")
    if not valid_name(room):
        raise BadRequest(f"room must be a string of 1-{MAX_NAME} printable characters")
    assert isinstance(room, str)
    return room


def _since(message: dict[str, Any]) -> int | None:
    since = message.get("since")
    if since is None:
        return None
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise BadRequest("since must be a non-negative integer message id")
    return since


def _epoch(message: dict[str, Any]) -> str | None:
    epoch = message.get("epoch")
    if epoch is None:
        return None
    if not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH:
        raise BadRequest(f"epoch must be a string of 1-{MAX_EPOCH} characters")
    return epoch


def _ping(message: dict[str, Any]) -> Ping:
    ping_id = message.get("id")
    if ping_id is not None and (
        isinstance(ping_id, bool) or not isinstance(ping_id, str | int) or len(str(ping_id)) > 64
    ):
        raise BadRequest("ping id must be a string or an integer (at most 64 characters)")
    return Ping(ping_id)


def _send(message: dict[str, Any]) -> Send:
    text = message.get("text")
    if not isinstance(text, str):
        raise BadRequest("text must be a string")
    client_msg_id = message.get("client_msg_id")
    if client_msg_id is None:
        client_msg_id = "srv-" + secrets.token_hex(8)
    if not isinstance(client_msg_id, str) or not 0 < len(client_msg_id) <= MAX_CLIENT_MSG_ID:
        raise BadRequest(f"client_msg_id must be a string of 1-{MAX_CLIENT_MSG_ID} characters")
    return Send(_room(message), text, client_msg_id)


def parse_command(text: str) -> Command:
    """One client message; raises BadRequest with the detail to report."""
    try:
        message = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise BadRequest("a message must be a JSON object")
    op = message.get("op")
    if op == "join":
        return Join(_room(message), _since(message), _epoch(message))
    if op == "send":
        return _send(message)
    if op == "presence":
        return Presence(_room(message))
    if op == "leave":
        return Leave(_room(message))
    if op == "ping":
        return _ping(message)
    raise BadRequest(f"unknown op {op!r}: expected join, leave, send, presence or ping")


def dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def error(code: str, **fields: Any) -> str:
    return dumps({**fields, "op": "error", "code": code})


def joined(room: str, backend: str, user: str, epoch: str) -> str:
    return dumps({"op": "joined", "room": room, "backend": backend, "user": user, "epoch": epoch})


def history_gap(room: str, reason: str, epoch: str, oldest: int | None) -> str:
    """Messages after the client's resume point are gone (``trimmed``, or ``epoch``: lost)."""
    event: dict[str, Any] = {"op": "history_gap", "room": room, "reason": reason, "epoch": epoch}
    if oldest is not None:
        event["oldest"] = oldest
    return dumps(event)


def pong(ping: Ping) -> str:
    return dumps({"op": "pong"} if ping.id is None else {"op": "pong", "id": ping.id})


def quick_ping(text: str) -> Ping | None:
    """``text`` as a ping, if it is one (short texts only: pings skip the command queue)."""
    if len(text) > MAX_PING or '"ping"' not in text:
        return None
    try:
        command = parse_command(text)
    except BadRequest:
        return None
    return command if isinstance(command, Ping) else None


def left(room: str) -> str:
    return dumps({"op": "left", "room": room})


def presence(room: str, users: list[str]) -> str:
    return dumps({"op": "presence", "room": room, "users": users})


def message_parts(room: str, user: str, send: Send) -> tuple[str, str]:
    """The ``msg`` JSON split around its id, which only the Redis script knows.

    ``head + str(id) + tail`` is ``{"op":"msg","room":R,"id":ID,"from":U,"text":T,
    "client_msg_id":C}``.
    """
    head = '{"op":"msg","room":' + json.dumps(room, ensure_ascii=False) + ',"id":'
    tail = (
        ',"from":'
        + json.dumps(user, ensure_ascii=False)
        + ',"text":'
        + json.dumps(send.text, ensure_ascii=False)
        + ',"client_msg_id":'
        + json.dumps(send.client_msg_id, ensure_ascii=False)
        + "}"
    )
    return head, tail


def message_id(payload: str) -> int:
    """The id of a ``msg`` JSON payload made by :func:`message_parts`."""
    value = json.loads(payload)["id"]
    assert isinstance(value, int)
    return value


def as_duplicate(payload: str) -> str:
    """The stored ``msg`` as answered to a repeated send: the same event plus duplicate=true."""
    return payload[:-1] + ',"duplicate":true}'
