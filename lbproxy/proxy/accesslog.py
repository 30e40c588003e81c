"""One access-log line per connection, written when it closes (never per chunk)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lbproxy.proxy.context import access_log

if TYPE_CHECKING:
    from lbproxy.core.pool import Backend
    from lbproxy.proxy.context import ListenerContext


def log_connection(
    ctx: ListenerContext,
    client: str,
    backend: Backend | None,
    duration: float,
    bytes_in: int,
    bytes_out: int,
    reason: str,
    status: int = 0,
    messages: tuple[int, int] | None = None,
) -> None:
    """``messages``: a websocket's data messages (client -> backend, backend -> client)."""
    fields: dict[str, object] = {
        "client": client,
        "listener": ctx.config.name,
        "pool": ctx.pool.name,
        "backend": backend.id if backend is not None else "-",
        "duration": round(duration, 6),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "reason": reason,
    }
    if status:
        fields["status"] = status
    shown = ""
    if messages is not None:
        fields["messages_in"], fields["messages_out"] = messages
        shown = f" msgs_in={messages[0]} msgs_out={messages[1]}"
    access_log.info(
        "%s %s -> %s/%s %.3fs in=%d out=%d%s %s%s",
        client,
        ctx.config.name,
        ctx.pool.name,
        fields["backend"],
        duration,
        bytes_in,
        bytes_out,
        shown,
        reason,
        f" status={status}" if status else "",
        extra={"fields": fields},
    )
