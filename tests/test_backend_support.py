"""Helpers shared by the backend tests (no tests here): in-process backend, raw HTTP client."""

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

from lbproxy.backend.server import BackendOptions, serve_backend
from lbproxy.config_types import Address
from tests.support import Proc, free_port, wait_until


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


def backend_process(**options: Any) -> tuple[Proc, Address]:
    """A backend in a subprocess via run_backend (uvloop), ready when /healthz answers."""
    port = free_port()
    fields = ", ".join(f"{k}={v!r}" for k, v in options.items())
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from lbproxy.backend.server import BackendOptions, run_backend\n"
        "from lbproxy.config_types import Address\n"
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
