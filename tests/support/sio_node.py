"""A python-socketio node on uvicorn for the recipe tests: ``python -m tests.support.sio_node``.

Socket.IO at /socket.io/ (state shared by ``AsyncRedisManager``), plus plain routes:
``GET /whoami`` (the node id), a plain websocket at ``/ws`` (greets, then echoes) and
``GET /sse?n=N`` (a Server-Sent Events stream of N events, one every 50 ms, each naming
the node).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import socketio
import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def build(node: str, redis_url: str, ping: float) -> socketio.ASGIApp:
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=socketio.AsyncRedisManager(redis_url),
        ping_interval=ping,
        ping_timeout=ping,
        cors_allowed_origins=[],
    )

    @sio.event  # type: ignore[misc]
    async def connect(sid: str, environ: dict[str, Any]) -> None:
        await sio.emit("hello", {"node": node}, to=sid)

    @sio.on("whoami")  # type: ignore[misc]
    async def whoami(sid: str, data: object = None) -> str:
        return node

    @sio.on("broadcast")  # type: ignore[misc]
    async def broadcast(sid: str, data: object) -> None:
        await sio.emit("news", {"from": node, "data": data})  # every client on every node

    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await _echo(receive, send, node)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/whoami":
            await _respond(send, 200, "text/plain", node.encode())
        elif path == "/sse":
            query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
            await _sse(send, node, int(query.get("n", "5")))
        else:
            await _respond(send, 404, "text/plain", b"not found")

    return socketio.ASGIApp(sio, other_asgi_app=plain)


async def _echo(receive: Receive, send: Send, node: str) -> None:
    """A plain websocket: greets with the node id, then echoes every text message."""
    while True:
        event = await receive()
        if event["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": f"node {node}"})
        elif event["type"] == "websocket.receive":
            text = event.get("text") or (event.get("bytes") or b"").decode()
            await send({"type": "websocket.send", "text": text})
        else:
            return


async def _respond(send: Send, status: int, content_type: str, body: bytes) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _sse(send: Send, node: str, count: int) -> None:
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for i in range(count):
        event = f"id: {i}\nevent: tick\ndata: {node} {i}\n\n".encode()
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": b""})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--ping", type=float, default=2.0)
    args = parser.parse_args()
    app = build(args.id, args.redis, args.ping)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
