"""Value types produced by the HTTP/1.1 head parsers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_HEAD = 65536

BodyKind = Literal["none", "length", "chunked", "close"]
Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class BodyFraming:
    """How a message body is delimited.

    ``none``: no body (a zero Content-Length is reported as ``none`` too); ``length``: exactly
    ``length`` bytes; ``chunked``: chunked transfer coding; ``close``: until EOF (responses only).
    """

    kind: BodyKind
    length: int = 0


NO_BODY = BodyFraming("none")
CHUNKED = BodyFraming("chunked")
UNTIL_CLOSE = BodyFraming("close")


def _first(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed, validated request head."""

    method: bytes
    target: bytes
    version: bytes
    headers: Headers  # (lower-cased name, value), in order, values stripped
    raw_headers: Headers  # (original-case name, value), for re-serialisation
    keep_alive: bool
    websocket: bool
    body: BodyFraming

    def header(self, name: bytes) -> bytes | None:
        """The first value of the lower-cased header ``name``, or None."""
        return _first(self.headers, name)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed, validated response head (final or informational)."""

    status: int
    reason: bytes
    version: bytes
    headers: Headers  # (lower-cased name, value), in order, values stripped
    keep_alive: bool
    body: BodyFraming

    def header(self, name: bytes) -> bytes | None:
        """The first value of the lower-cased header ``name``, or None."""
        return _first(self.headers, name)
