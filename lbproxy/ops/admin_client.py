"""Clients of the admin API for `lbproxy status`, `lbproxy drain` and `lbproxy enable`.

Plain urllib (no extra dependencies). Each function prints its result, writes one
clear line to stderr on failure and returns the process exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlsplit

TIMEOUT = 10.0
TOKEN_ENV = "LBPROXY_ADMIN_TOKEN"
COLUMNS = ("POOL", "BACKEND", "ADDRESS", "STATE", "ACTIVE", "WEIGHT")


class AdminApiError(Exception):
    """A failed admin API call; the message is what the user sees, status the HTTP status."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _base(admin_url: str) -> str:
    url = admin_url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def admin_host(url: str) -> str:
    """The Host header the CLI sends: ``localhost[:PORT]``, which the admin API always accepts.

    (The Host check is against browsers tricked by DNS rebinding; the CLI is no browser, and
    so `lbproxy status --admin http://10.0.0.5:9901` works without an allowed_hosts entry.)
    """
    try:
        port = urlsplit(url).port
    except ValueError:
        port = None
    return "localhost" if port is None else f"localhost:{port}"


def _call(
    admin_url: str, method: str, path: str, token: str, timeout: float = TIMEOUT
) -> tuple[int, bytes]:
    """One request; returns (status, body) for 2xx, raises AdminApiError with the reason."""
    url = _base(admin_url) + path
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    request.add_header("Host", admin_host(url))
    token = token or os.environ.get(TOKEN_ENV, "")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        # (the admin API refuses what comes through a proxy: http_proxy & co. are ignored)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read()
        if exc.code == 422:  # (POST /api/upgrade: the configuration's problems, one a line)
            raise AdminApiError(_error_text(body), 422) from None
        if exc.code == 401:
            raise AdminApiError(f"unauthorized: set --token or {TOKEN_ENV}", 401) from None
        message = f"admin API error: HTTP {exc.code}: {_error_text(body)}"
        raise AdminApiError(message, exc.code) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminApiError(f"cannot reach admin API at {admin_url}: {reason}") from None


def _error_text(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:200]
    if isinstance(document, dict) and "error" in document:
        return str(document["error"])
    return str(document)[:200]


def _fail(message: str) -> int:
    print(f"lbproxy: {message}", file=sys.stderr)
    return 1


def format_table(document: dict[str, Any]) -> str:
    """The status table: one line per backend, columns aligned."""
    rows = [COLUMNS]
    for pool_name, pool in sorted(document.get("pools", {}).items()):
        for backend in pool.get("backends", []):
            rows.append(
                (
                    pool_name,
                    str(backend["id"]),
                    str(backend["address"]),
                    str(backend["state"]),
                    str(backend["active"]),
                    str(backend["weight"]),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def status(admin_url: str, as_json: bool, token: str = "") -> int:
    """Print the pools and backends (a table, or the JSON document); return the exit code."""
    try:
        _, body = _call(admin_url, "GET", "/api/pools", token)
        document = json.loads(body)
    except AdminApiError as exc:
        return _fail(str(exc))
    except ValueError:
        return _fail(f"admin API at {admin_url} did not return JSON")
    if not isinstance(document, dict) or not isinstance(document.get("pools"), dict):
        return _fail(f"admin API at {admin_url} returned an unexpected document")
    print(json.dumps(document, indent=2) if as_json else format_table(document))
    return 0


def _change(admin_url: str, pool: str, backend_id: str, action: str, token: str) -> int:
    path = f"/api/pools/{quote(pool, safe='')}/backends/{quote(backend_id, safe='')}/{action}"
    try:
        _call(admin_url, "POST", path, token)
    except AdminApiError as exc:
        if exc.status == 404:
            return _fail(f"no backend {backend_id} in pool {pool}")
        return _fail(str(exc))
    done = "draining" if action == "drain" else "enabled"
    print(f"{done} backend {backend_id} in pool {pool}")
    return 0


def drain(admin_url: str, pool: str, backend_id: str, token: str = "") -> int:
    """Drain one backend through the admin API; return the exit code."""
    return _change(admin_url, pool, backend_id, "drain", token)


def enable(admin_url: str, pool: str, backend_id: str, token: str = "") -> int:
    """Put one backend back in service through the admin API; return the exit code."""
    return _change(admin_url, pool, backend_id, "enable", token)


UPGRADE_TIMEOUT = 120.0  # validation, the new workers' start and the hand-over
RESTART_TIMEOUT = 30.0  # then the supervisor itself, re-executed, answering again


def upgrade(admin_url: str, token: str = "") -> int:
    """POST /api/upgrade and wait for the new generation to answer; the exit code: 0 done,
    1 failed (the old generation serves on), 2 invalid configuration (nothing changed)."""
    try:
        _, body = _call(admin_url, "POST", "/api/upgrade", token, UPGRADE_TIMEOUT)
        document = json.loads(body)
        generation = int(document["generation"])
    except AdminApiError as exc:
        if exc.status == 422:
            print(str(exc), file=sys.stderr)
            return 2
        return _fail(f"upgrade failed: {exc}")
    except (ValueError, KeyError, TypeError):
        return _fail(f"admin API at {admin_url} returned an unexpected document")
    deadline = time.monotonic() + RESTART_TIMEOUT
    while time.monotonic() < deadline:  # the supervisor re-executes itself: wait for it
        try:
            _, body = _call(admin_url, "GET", "/api/info", token, 2.0)
            if int(json.loads(body).get("generation", 0)) >= generation:
                moved, took = document.get("moved", 0), document.get("handover_seconds", 0.0)
                print(
                    f"upgraded: generation {generation} serves ({moved} tunnel(s) handed over "
                    f"in {took:.3f}s; {document.get('seconds', 0.0):.2f}s with the start)"
                )
                return 0
        except (AdminApiError, ValueError, TypeError, AttributeError):
            pass
        time.sleep(0.1)
    return _fail(f"generation {generation} took over but the supervisor did not answer again")
