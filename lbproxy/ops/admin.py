"""The admin HTTP server: /healthz, /metrics, the pools API, drain/enable and the dashboard.

asyncio streams + h11, no framework. Routing is a plain function of (method, path,
headers) so it is easy to read; the connection loop only does HTTP/1.1 framing,
keep-alive and error responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import h11
from prometheus_client import CollectorRegistry

from lbproxy.config.types import Address, AdminConfig
from lbproxy.core.pool import Pool
from lbproxy.ops.admin_guard import HostPolicy, refusal
from lbproxy.ops.metrics import render
from lbproxy.ops.stats import History
from lbproxy.ops.upgrade_state import NO_UPGRADE

IDLE_TIMEOUT = 60.0  # a keep-alive connection with no request for this long is closed
# beyond admin.max_connections: this many at a time get their request read and a 503;
# more than that are closed at once (they all use file descriptors from the reserve)
MAX_REFUSING = 4
REFUSE_TIMEOUT = 2.0  # a refused connection gets this long to send its request head
MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
JSON_TYPE = "application/json"
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Deferred:
    """An answer that takes a while (POST /api/upgrade waits for the new generation)."""

    make: Callable[[], Awaitable[Response]]


UpgradeHook = Callable[[], Awaitable[tuple[int, dict[str, object]]]]
UPGRADE_STATUS = {0: 200, 1: 500, 2: 422, 3: 409}  # ok, failed start, bad config, busy


def json_response(status: int, value: object, *headers: tuple[str, str]) -> Response:
    return Response(status, json.dumps(value).encode() + b"\n", JSON_TYPE, headers)


def error(status: int, message: str, *headers: tuple[str, str]) -> Response:
    return json_response(status, {"error": message}, *headers)


def pools_document(pools: Mapping[str, Pool]) -> dict[str, object]:
    """The body of GET /api/pools."""
    return {
        "pools": {
            name: {
                "balance": pool.config.balance,
                "discovery": pool.config.discovery,
                "least_connections_scope": pool.config.least_connections_scope,
                "scope_effective": "local" if pool.remote is None else "cluster",
                "backends": [
                    {
                        "id": b.id,
                        "address": str(b.address),
                        "state": b.state.value,
                        "active": pool.active(b),
                        **({} if pool.remote is None else {"cluster_active": pool.load(b)}),
                        "weight": b.weight,
                        "source": b.source,
                    }
                    for _, b in sorted(pool.backends.items())
                ],
            }
            for name, pool in sorted(pools.items())
        }
    }


class AdminServer:
    """One small HTTP/1.1 server on ``config.listen``."""

    def __init__(
        self,
        config: AdminConfig,
        pools: Callable[[], Mapping[str, Pool]],
        registry: CollectorRegistry,
        history: History | None = None,
        info: Callable[[], dict[str, object]] | None = None,
        *,
        upgrade: UpgradeHook | None = None,
    ) -> None:
        self._upgrade = upgrade
        self.history = history
        self._info = info
        self._config = config
        self._pools = pools
        self.registry = registry
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[object]] = set()
        self._refusing: set[asyncio.Task[object]] = set()
        self._dashboard: bytes | None = None
        self._hosts = HostPolicy.build(config.listen.host, config.allowed_hosts)

    async def start(self) -> Address:
        listen = self._config.listen
        self._server = await asyncio.start_server(self._serve, listen.host, listen.port)
        port = self._server.sockets[0].getsockname()[1]
        return Address(listen.host, int(port))

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = [*self._connections, *self._refusing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # -- connections ---------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._connections) >= self._config.max_connections:
            await self._refuse(reader, writer, task)
            return
        if task is not None:
            self._connections.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    request = await _read_request(conn, reader)
                if request is None:
                    break
                reply = self.handle(request)
                if isinstance(reply, Deferred):
                    reply = await reply.make()
                await _send(conn, writer, request.method, reply)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                reply = error(exc.error_status_hint, f"bad request: {exc}")
                with contextlib.suppress(OSError, h11.LocalProtocolError):
                    await _send(conn, writer, b"GET", reply)
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass  # client gone, idle, or the server stopping: just close
        finally:
            if conn.our_state is h11.ERROR:
                writer.transport.abort()
            else:
                writer.close()
            if task is not None:
                self._connections.discard(task)

    async def _refuse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        task: asyncio.Task[object] | None,
    ) -> None:
        """Over max_connections: read the request, answer 503, close (an HTTP client or a
        Prometheus scrape sees a clear status rather than a reset). Past MAX_REFUSING
        such connections at once, close without reading."""
        if len(self._refusing) >= MAX_REFUSING or task is None:
            writer.transport.abort()
            return
        self._refusing.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        limit = self._config.max_connections
        reply = error(
            503,
            f"too many admin connections (admin.max_connections = {limit})",
            ("Retry-After", "1"),
            ("Connection", "close"),
        )
        try:
            async with asyncio.timeout(REFUSE_TIMEOUT):
                request = await _read_request(conn, reader)
                if request is not None:
                    await _send(conn, writer, request.method, reply)
        except (OSError, TimeoutError, h11.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            self._refusing.discard(task)
            if conn.our_state is h11.ERROR or conn.our_state is h11.SEND_RESPONSE:
                writer.transport.abort()
            else:
                writer.close()

    # -- routing -------------------------------------------------------------
    def handle(self, request: h11.Request) -> Response | Deferred:
        """Answer one request (the body has been read and ignored)."""
        method = request.method.decode("ascii", "replace")
        headers = {name.decode("latin-1"): value for name, value in request.headers}
        refused = refusal(self._hosts, headers, method)
        if refused is not None:
            return error(*refused)
        path = urlsplit(request.target.decode("ascii", "replace")).path
        parts = [unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
        if parts == ["api", "upgrade"]:
            return self._upgrade_route(method, headers)
        change = _change_route(parts)
        if change is not None:
            return self._change(method, headers, *change)
        getters: dict[tuple[str, ...], Callable[[], Response]] = {
            (): self._dashboard_page,
            ("healthz",): lambda: Response(200, b"ok\n", "text/plain; charset=utf-8"),
            ("metrics",): self._metrics,
            ("api", "pools"): lambda: json_response(200, pools_document(self._pools())),
            ("api", "history"): lambda: self._history(request.target),
            ("api", "info"): self._info_document,
        }
        getter = getters.get(tuple(parts))
        if getter is None:
            return error(404, f"no such resource: {path}")
        if method not in ("GET", "HEAD"):
            return error(405, f"method {method} not allowed", ("Allow", "GET, HEAD"))
        return getter()

    def _change(
        self,
        method: str,
        headers: Mapping[str, bytes],
        pool_name: str,
        backend_id: str,
        action: str,
    ) -> Response:
        """POST /api/pools/{pool}/backends/{id}/{drain|enable}."""
        if method != "POST":
            return error(405, f"method {method} not allowed", ("Allow", "POST"))
        if not self._authorized(headers):
            challenge = ("WWW-Authenticate", 'Bearer realm="lbproxy"')
            return error(401, "unauthorized: a valid bearer token is required", challenge)
        if not _same_origin(headers):
            return error(403, "cross-origin request refused")
        pool = self._pools().get(pool_name)
        if pool is None:
            return error(404, f"no pool {pool_name!r}")
        backend = pool.get(backend_id)
        if backend is None:
            return error(404, f"no backend {backend_id!r} in pool {pool_name!r}")
        if action == "drain":
            pool.drain(backend_id, "drained via admin API")
            status = 202
        elif backend.removed:
            return error(409, f"backend {backend_id!r} was removed from pool {pool_name!r}")
        else:
            pool.enable(backend_id, "enabled via admin API")
            status = 200
        result = {"pool": pool_name, "backend": backend_id, "state": backend.state.value}
        return json_response(status, result)

    def _upgrade_route(self, method: str, headers: Mapping[str, bytes]) -> Response | Deferred:
        """POST /api/upgrade: the next generation; answered once it has taken over."""
        if method != "POST":
            return error(405, f"method {method} not allowed", ("Allow", "POST"))
        if not self._authorized(headers):
            challenge = ("WWW-Authenticate", 'Bearer realm="lbproxy"')
            return error(401, "unauthorized: a valid bearer token is required", challenge)
        if not _same_origin(headers):
            return error(403, "cross-origin request refused")
        hook = self._upgrade
        if hook is None:
            return error(409, NO_UPGRADE)

        async def run() -> Response:
            code, document = await hook()
            return json_response(UPGRADE_STATUS.get(code, 500), document)

        return Deferred(run)

    def _authorized(self, headers: Mapping[str, bytes]) -> bool:
        token = self._config.token
        if not token:
            return True
        expected = b"Bearer " + token.encode()
        return hmac.compare_digest(headers.get("authorization", b""), expected)

    def _history(self, target: bytes) -> Response:
        """GET /api/history[?since=SEQ]: the per-backend samples of the last minutes."""
        if self.history is None:
            return error(404, "no history on this server")
        query = parse_qs(urlsplit(target.decode("ascii", "replace")).query)
        try:
            since = int(query.get("since", ["0"])[0])
        except ValueError:
            return error(400, "since: must be an integer")
        return json_response(200, self.history.document(since))

    def _info_document(self) -> Response:
        """GET /api/info: version, supervisor pid, workers, generation, start time."""
        if self._info is None:
            return error(404, "no balancer information on this server")
        return json_response(200, self._info())

    def _metrics(self) -> Response:
        body, content_type = render(self.registry)
        return Response(200, body, content_type)

    def _dashboard_page(self) -> Response:
        if self._dashboard is None:
            page = importlib.resources.files("lbproxy").joinpath("static/dashboard.html")
            self._dashboard = page.read_bytes()
        headers = (
            ("Content-Security-Policy", DASHBOARD_CSP),
            ("X-Frame-Options", "DENY"),
            ("X-Content-Type-Options", "nosniff"),
        )
        return Response(200, self._dashboard, "text/html; charset=utf-8", headers)


def _change_route(parts: list[str]) -> tuple[str, str, str] | None:
    """(pool, backend id, action) for api/pools/{pool}/backends/{id}/{drain|enable}."""
    if len(parts) != 6 or parts[:2] != ["api", "pools"] or parts[3] != "backends":
        return None
    if parts[5] not in ("drain", "enable"):
        return None
    return parts[2], parts[4], parts[5]


def _same_origin(headers: Mapping[str, bytes]) -> bool:
    """A browser's cross-site POST carries a foreign Origin: refuse it (CSRF on an open API)."""
    origin = headers.get("origin")
    if origin is None:
        return True  # not a browser (curl, lbproxy drain)
    netloc = urlsplit(origin.decode("latin-1")).netloc
    return netloc != "" and netloc == headers.get("host", b"").decode("latin-1")


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    """The next request with its body consumed; None when the client closed between requests."""
    request: h11.Request | None = None
    body = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_BODY:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(
    conn: h11.Connection, writer: asyncio.StreamWriter, method: bytes, response: Response
) -> None:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Cache-Control", "no-store"),
        *response.headers,
    ]
    writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
    if method != b"HEAD":
        writer.write(conn.send(h11.Data(data=response.body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()
