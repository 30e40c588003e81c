"""The reference head parser: h11 validates the syntax, lbproxy adds the strict checks.

h11 accepts a few shapes lbproxy refuses (bare LF, obs-fold, repeated identical Content-Length,
Content-Length together with Transfer-Encoding); :func:`locate_head` and :func:`build_request`
refuse them here exactly as they do for the fast parser.
"""

from __future__ import annotations

import h11

from lbproxy.core.http1._common import (
    build_request,
    build_response,
    framing_from_headers,
    locate_head,
)
from lbproxy.core.http1._types import Headers, RequestHead, ResponseHead
from lbproxy.errors import HttpError


def _refuse_obs_fold(head: bytes, bad: int) -> None:
    # h11 would join a continuation line to the previous one; lbproxy refuses it.
    if b"\n " in head or b"\n\t" in head:
        raise HttpError(bad, "obsolete line folding")


def _received_fields(head: bytes) -> Headers:
    """Every header line exactly as received (duplicates kept), for a head h11 validated."""
    fields = []
    for line in head.split(b"\r\n")[1:-2]:
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t")))
    return tuple(fields)


def _request_error(exc: h11.RemoteProtocolError, head: bytes) -> HttpError:
    if exc.error_status_hint == 501:
        # h11 rejects transfer codings only once every line parsed: classify them our way.
        lengths, codings = [], []
        for name, value in _received_fields(head):
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.append(value)
        framing_from_headers(lengths, codings, 400, 501)
        return HttpError(501, str(exc))
    return HttpError(400, str(exc) or "malformed request head")


def parse_request(buf: bytes | bytearray, max_head: int) -> tuple[RequestHead, int] | None:
    """See :func:`lbproxy.core.http1.parse_request_head`."""
    span = locate_head(buf, max_head, 431, 400)
    if span is None:
        return None
    start, end = span
    head = bytes(buf[start:end])
    _refuse_obs_fold(head, 400)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise _request_error(exc, head) from None
    if not isinstance(event, h11.Request):
        raise HttpError(400, "malformed request head")
    request = build_request(
        event.method,
        event.target,
        event.http_version,
        tuple(event.headers),
        tuple(event.headers.raw_items()),
        _received_fields(head),
    )
    return request, end


def _client_awaiting_response(request_method: bytes, max_event: int) -> h11.Connection:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_event)
    # Proposing an upgrade lets h11 accept a 101 as well as any other answer.
    proposal = [(b"Host", b"backend"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    conn.send(h11.Request(method=request_method, target=b"/", headers=proposal))
    conn.send(h11.EndOfMessage())
    return conn


def parse_response(
    buf: bytes | bytearray, request_method: bytes, max_head: int
) -> tuple[ResponseHead, int] | None:
    """See :func:`lbproxy.core.http1.parse_response_head`."""
    span = locate_head(buf, max_head, 502, 502)
    if span is None:
        return None
    start, end = span
    head = bytes(buf[start:end])
    _refuse_obs_fold(head, 502)
    conn = _client_awaiting_response(request_method, len(head) + 1)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise HttpError(502, f"malformed response head from backend: {exc}") from None
    if not isinstance(event, h11.Response | h11.InformationalResponse):
        raise HttpError(502, "malformed response head from backend")
    response = build_response(
        event.status_code,
        event.reason,
        event.http_version,
        tuple(event.headers),
        _received_fields(head),
        request_method,
    )
    return response, end
