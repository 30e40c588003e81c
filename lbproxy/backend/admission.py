"""Admission of a /chat upgrade: who the user is, and the session cookie for the 101.

The user comes from ``?user=NAME``, else from the ``session`` cookie, whose random id maps to a
user name in Redis (with expiry). Every admitted upgrade gets ``Set-Cookie: session=...`` on its
101: a new session id on first connect, the same one (with a fresh expiry) on reconnect; a
``?user=`` that differs from the session's user rebinds the session. Without a usable session
and without ``user`` the upgrade is refused with 400. When Redis is unreachable a connection
that names its user is still admitted (without a cookie); one that does not gets 503.
"""

from __future__ import annotations

import logging
import secrets
from http.cookies import CookieError, SimpleCookie

from redis.exceptions import RedisError

from lbproxy.backend import chat_protocol as proto
from lbproxy.backend.routes import Response
from lbproxy.backend.store import ChatStore
from lbproxy.backend.wire import Header, WebSocketRequest

log = logging.getLogger(__name__)

COOKIE = "session"


async def admit(
    store: ChatStore, request: WebSocketRequest, session_ttl: float
) -> tuple[str, list[Header]] | Response:
    """The user and the extra 101 headers for a /chat upgrade, or the HTTP refusal."""
    user = request.query.get("user") or None
    if user is not None and not proto.valid_name(user):
        return _reject(400, f"user must be 1-{proto.MAX_NAME} printable characters")
    session_id = _session_cookie(request.header("cookie"))
    try:
        known = None if session_id is None else await store.session_user(session_id)
        if user is None and known is None:
            return _reject(400, "user required: /chat?user=NAME (no valid session cookie)")
        user = user or known
        assert user is not None
        if known is None or session_id is None:
            session_id = secrets.token_urlsafe(18)
        await store.save_session(session_id, user)
    except (RedisError, OSError) as exc:
        if user is None:
            return _reject(503, f"sessions unavailable: {exc}")
        log.warning("chat: session store unavailable (%s); %s connects without one", exc, user)
        return user, []
    max_age = max(1, int(session_ttl))
    cookie = f"{COOKIE}={session_id}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax"
    return user, [("set-cookie", cookie)]


def _reject(status: int, text: str) -> Response:
    return Response(status, (("content-type", "text/plain; charset=utf-8"),), text.encode())


def _session_cookie(header: str | None) -> str | None:
    if not header:
        return None
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(header)
    except CookieError:
        return None
    morsel = cookie.get(COOKIE)
    if morsel is None:
        return None
    value = morsel.value
    ok = 16 <= len(value) <= 64 and all(c.isalnum() or c in "-_" for c in value)
    return value if ok else None
