"""Pure HTTP routing of the reference backend: a request and the server's status in, a response out.

Routes (README "The reference chat backend", plus test helpers):

- ``GET /healthz``: 200 ``ok`` (503 ``draining`` while draining)
- ``GET /whoami``: ``{"id": ..., "connections": N}`` (N = open websockets)
- ``GET /``: the chat page
- ``GET /headers``: the request headers as a JSON list of ``[name, value]`` (names lower case)
- ``GET /slow?bytes=N[&chunk=C][&delay_ms=D]``: N bytes of :func:`slow_body` in chunks of C
  bytes (default 16384) with chunked transfer-encoding, D ms apart (default 0)
- ``POST /echo-body``: the request body back, with the request's content-type
"""

from __future__ import annotations

import json

from lbproxy.backend.events import Response, ServerView, StreamResponse
from lbproxy.backend.wire import HttpRequest

__all__ = ["Response", "ServerView", "StreamResponse", "route_http", "slow_body"]

MAX_SLOW_BYTES = 1 << 30
MAX_SLOW_DELAY_MS = 10_000
PATTERN_PERIOD = 251  # prime, so framing bugs that shift bytes show up in a comparison
_PATTERN = bytes(range(PATTERN_PERIOD)) * 262  # about 64 KiB

TEXT = ("content-type", "text/plain; charset=utf-8")
JSON = ("content-type", "application/json")
HTML = ("content-type", "text/html; charset=utf-8")


def slow_body(offset: int, size: int) -> bytes:
    """``size`` bytes of the /slow body starting at ``offset`` (a repeating 0..250 pattern)."""
    out = bytearray()
    while size > 0:
        start = offset % PATTERN_PERIOD
        take = min(size, len(_PATTERN) - start)
        out += _PATTERN[start : start + take]
        offset += take
        size -= take
    return bytes(out)


def _text(status: int, text: str) -> Response:
    return Response(status, (TEXT,), text.encode())


def _int_param(request: HttpRequest, name: str, default: int, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if low <= value <= high else None


def _slow(request: HttpRequest) -> Response | StreamResponse:
    total = _int_param(request, "bytes", 0, 0, MAX_SLOW_BYTES)
    chunk = _int_param(request, "chunk", 16384, 1, 1 << 20)
    delay_ms = _int_param(request, "delay_ms", 0, 0, MAX_SLOW_DELAY_MS)
    if total is None or chunk is None or delay_ms is None:
        return _text(400, "bad query: bytes=0..2**30, chunk=1..2**20, delay_ms=0..10000\n")
    headers = (("content-type", "application/octet-stream"),)
    return StreamResponse(200, headers, total, chunk, delay_ms / 1000)


GET_ROUTES = frozenset({"/", "/healthz", "/whoami", "/headers", "/slow"})


def route_http(request: HttpRequest, view: ServerView) -> Response | StreamResponse:
    """The response to a plain (non-websocket) HTTP request."""
    path = request.path
    if path == "/echo-body":
        if request.method != "POST":
            return Response(405, (TEXT, ("allow", "POST")), b"method not allowed\n")
        content_type = request.header("content-type") or "application/octet-stream"
        return Response(200, (("content-type", content_type),), request.body)
    if path not in GET_ROUTES:
        if path in ("/echo", "/chat"):
            return _text(426, "websocket upgrade required\n")
        return _text(404, "not found\n")
    if request.method not in ("GET", "HEAD"):
        return Response(405, (TEXT, ("allow", "GET, HEAD")), b"method not allowed\n")
    if path == "/healthz":
        return _text(503, "draining") if view.draining else _text(200, "ok")
    if path == "/whoami":
        body = json.dumps({"id": view.backend_id, "connections": view.connections})
        return Response(200, (JSON,), body.encode())
    if path == "/headers":
        return Response(200, (JSON,), json.dumps([list(h) for h in request.headers]).encode())
    if path == "/slow":
        return _slow(request)
    return Response(200, (HTML, ("cache-control", "no-cache")), view.page)
