"""Helpers shared by the backend tests: in-process backend, raw HTTP client, chat client."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import h11
import websockets

from lbproxy.backend.server import BackendOptions, serve_backend
from lbproxy.config.types import Address
from tests.support.ports import free_port, wait_until
from tests.support.processes import Proc


@contextlib.asynccontextmanager
async def running_backend(options: BackendOptions | None = None) -> AsyncIterator[Address]:
    """serve_backend in a task of this loop, on a free port; cancelled at exit."""
    opts = options or BackendOptions(Address("127.0.0.1", 0))
    if opts.listen.port != 0:
        opts = replace(opts, listen=Address(opts.listen.host, 0))
    ready: asyncio.Future[Address] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_backend(opts, ready=ready.set_result))
    waiters: set[asyncio.Future[object]] = {task, ready}  # type: ignore[arg-type]
    await asyncio.wait(waiters, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises what went wrong
    assert ready.done(), "backend did not start within 10 s"
    try:
        yield ready.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def http_exchange(
    address: Address, requests: list[h11.Request | tuple[h11.Request, bytes]]
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send requests on ONE keep-alive connection; return (status, headers, body) for each."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    client = h11.Connection(h11.CLIENT)
    out: list[tuple[int, dict[str, str], bytes]] = []
    try:
        for item in requests:
            request, body = item if isinstance(item, tuple) else (item, b"")
            writer.write(client.send(request) or b"")
            if body:
                writer.write(client.send(h11.Data(data=body)) or b"")
            writer.write(client.send(h11.EndOfMessage()) or b"")
            out.append(await _read_response(client, reader))
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                client.start_next_cycle()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return out


async def _read_response(
    client: h11.Connection, reader: asyncio.StreamReader
) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = 0, {}, bytearray()
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await asyncio.wait_for(reader.read(65536), 10))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, headers, bytes(body)


def get(target: str, *headers: tuple[str, str]) -> h11.Request:
    return h11.Request(method="GET", target=target, headers=[("host", "t"), *headers])


async def http_get(address: Address, target: str) -> tuple[int, bytes]:
    ((status, _, body),) = await http_exchange(address, [get(target)])
    return status, body


async def whoami(address: Address) -> dict[str, Any]:
    status, body = await http_get(address, "/whoami")
    assert status == 200
    result: dict[str, Any] = json.loads(body)
    return result


def backend_process(port: int | None = None, **options: Any) -> tuple[Proc, Address]:
    """A backend in a subprocess via run_backend (uvloop), ready when /healthz answers."""
    port = port or free_port()
    fields = ", ".join(f"{k}={v!r}" for k, v in options.items())
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from lbproxy.backend.server import BackendOptions, run_backend\n"
        "from lbproxy.config.types import Address\n"
        f"run_backend(BackendOptions(Address('127.0.0.1', {port}), {fields}))\n"
    )
    proc = Proc([sys.executable, "-c", code])
    try:
        wait_until(lambda: healthz(port) == 200 or not proc.alive(), timeout=15)
        assert proc.alive(), proc.output()
    except BaseException:
        proc.stop()
        raise
    return proc, Address("127.0.0.1", port)


def healthz(port: int) -> int:
    """Status of GET /healthz (blocking; for polling a subprocess), 0 when unreachable."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


class ChatClient:
    """A /chat websocket speaking JSON, for tests."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(
        cls, address: Address, user: str | None = "u", cookie: str | None = None
    ) -> ChatClient:
        query = "" if user is None else f"?user={user}"
        headers = {"Cookie": cookie} if cookie else None
        ws = await websockets.connect(
            f"ws://{address}/chat{query}",
            additional_headers=headers,
            compression=None,
            close_timeout=2,
        )
        return cls(ws)

    async def send(self, **message: Any) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, str), raw
        result: dict[str, Any] = json.loads(raw)
        return result

    async def join(self, room: str, since: int | None = None) -> dict[str, Any]:
        if since is None:
            await self.send(op="join", room=room)
        else:
            await self.send(op="join", room=room, since=since)
        joined = await self.recv()
        assert joined["op"] == "joined" and joined["room"] == room, joined
        return joined

    async def say(self, room: str, text: str, client_msg_id: str | None = None) -> None:
        await self.send(op="send", room=room, text=text, client_msg_id=client_msg_id or text)

    async def messages(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """The next ``count`` msg events (failing on anything else)."""
        out: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < count:
            event = await self.recv(max(0.01, deadline - asyncio.get_running_loop().time()))
            assert event["op"] == "msg", event
            out.append(event)
        return out

    async def nothing_for(self, seconds: float) -> None:
        """Assert that no event arrives within ``seconds``."""
        with contextlib.suppress(TimeoutError):
            event = await self.recv(seconds)
            raise AssertionError(f"unexpected event {event}")

    async def close(self) -> None:
        await self.ws.close()


class CuttableProxy:
    """A TCP forwarder to ``target`` whose connectivity a test can cut and restore."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> CuttableProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def cut(self) -> None:
        """Stop accepting and reset every open connection."""
        assert self.server is not None
        self.server.close()
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()
        await self.server.wait_closed()
        self.server = None

    async def restore(self) -> None:
        await self.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.cut()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError:
            writer.transport.abort()
            return
        self.links |= {writer, up_writer}
        await asyncio.gather(
            _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
        )
        self.links -= {writer, up_writer}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()
