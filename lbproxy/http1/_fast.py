"""The fast head parser: a few compiled regular expressions, the same grammar as h11.

The grammar mirrors h11's ``_abnf.py`` (token names, VCHAR targets, field values of any byte
but NUL and whitespace with SP/HTAB runs inside, optional OWS around values, an optional reason
phrase), so both parsers accept exactly the same heads; the test-suite runs on both.
"""

from __future__ import annotations

import re

from lbproxy.errors import HttpError
from lbproxy.http1._common import build_request, build_response, locate_head
from lbproxy.http1._types import Headers, RequestHead, ResponseHead

_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\r\n")
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ((?:[ \t]|[^\x00\s])*+))?\r\n")
# One match per valid header line: anchored at a line start by the look-behind, ending at the
# line's CRLF. A line can hold at most one match, so "as many matches as lines" means "every
# line is valid". Possessive quantifiers keep the scan linear.
_HEADER_FIELD = re.compile(
    rb"(?<=\n)([-!#$%&'*+.^_`|~0-9a-zA-Z]++):[ \t]*+"
    rb"((?:[^\x00\s]++(?:[ \t]++[^\x00\s]++)*+)?)[ \t]*+\r\n"
)


def _fields(head: bytes, pos: int, bad: int) -> tuple[Headers, Headers]:
    """(lower-cased, original-case) header fields of ``head`` from ``pos`` to the blank line."""
    raw: list[tuple[bytes, bytes]] = _HEADER_FIELD.findall(head, pos)
    if len(raw) != head.count(b"\r\n", pos) - 1:
        raise HttpError(bad, "malformed header line")
    return tuple([(name.lower(), value) for name, value in raw]), tuple(raw)


def parse_request(buf: bytes | bytearray, max_head: int) -> tuple[RequestHead, int] | None:
    """See :func:`lbproxy.http1.parse_request_head`."""
    span = locate_head(buf, max_head, 431, 400)
    if span is None:
        return None
    start, end = span
    head = bytes(buf[start:end])
    line = _REQUEST_LINE.match(head)
    if line is None:
        raise HttpError(400, "malformed request line")
    headers, raw = _fields(head, line.end(), 400)
    method, target, version = line.group(1, 2, 3)
    return build_request(method, target, version, headers, raw, headers), end


def parse_response(
    buf: bytes | bytearray, request_method: bytes, max_head: int
) -> tuple[ResponseHead, int] | None:
    """See :func:`lbproxy.http1.parse_response_head`."""
    span = locate_head(buf, max_head, 502, 502)
    if span is None:
        return None
    start, end = span
    head = bytes(buf[start:end])
    line = _STATUS_LINE.match(head)
    if line is None:
        raise HttpError(502, "malformed status line from backend")
    headers, _raw = _fields(head, line.end(), 502)
    version, status, reason = line.group(1, 2, 3)
    response = build_response(int(status), reason or b"", version, headers, headers, request_method)
    return response, end
