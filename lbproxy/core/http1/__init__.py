"""Sans-IO HTTP/1.1 for the proxy: head parsing, head rewriting, error responses, body tracking.

Bytes in, values or bytes out; no sockets, no asyncio.

Two parsers sit behind :func:`parse_request_head` and :func:`parse_response_head`, chosen with
``parser=``: ``"fast"`` (the default: compiled regular expressions mirroring h11's grammar, about
4x quicker) and ``"h11"`` (h11 itself validates the syntax). Both then go through the same strict
checks and give identical results; the test-suite runs every case on both.

Strictness beyond h11 (request-smuggling shapes are refused, never normalised):

* lines must end with CRLF (bare LF or CR → 400) and obs-fold continuation lines → 400;
* Content-Length and Transfer-Encoding together → 400; more than one Content-Length header or a
  comma list, even with equal values → 400; Content-Length not 1-18 digits → 400;
* Transfer-Encoding: exactly "chunked" (any case) is supported; a repeated or misplaced chunked,
  chunked with parameters, bad syntax or several Transfer-Encoding headers → 400; any other coding
  list ("gzip, chunked", "xchunked", "identity") → 501; Transfer-Encoding in HTTP/1.0 → 400;
* missing (HTTP/1.1) or repeated Host → 400; a Host value that is not a valid authority (RFC 9110
  7.2: reg-name, IPv4 or [IP-literal], optional :port digits), or an absolute-form target whose
  authority is not, → 400; HTTP versions other than 1.0/1.1 → 505;
* chunk sizes of 2^63 or more → 400 (502 in responses): an int64 parser behind would read them
  as negative (ChunkedTracker);
* leading empty lines (CRLF) before the request line are skipped (RFC 9112 2.2) and counted in n.

Response heads get the same checks with every error reported as 502 (an over-long response head
too: the client gets the 502).
"""

from __future__ import annotations

from typing import Literal

from lbproxy.core.http1 import _fast, _h11
from lbproxy.core.http1._rewrite import (
    REASONS,
    add_response_headers,
    error_response,
    reason_phrase,
    rewrite_request,
    rewrite_response,
)
from lbproxy.core.http1._trackers import MAX_LINE, ChunkedTracker, LengthTracker
from lbproxy.core.http1._types import MAX_HEAD, BodyFraming, RequestHead, ResponseHead

__all__ = [
    "MAX_HEAD",
    "MAX_LINE",
    "REASONS",
    "BodyFraming",
    "ChunkedTracker",
    "LengthTracker",
    "Parser",
    "RequestHead",
    "ResponseHead",
    "add_response_headers",
    "error_response",
    "parse_request_head",
    "parse_response_head",
    "reason_phrase",
    "rewrite_request",
    "rewrite_response",
]

Parser = Literal["fast", "h11"]


def parse_request_head(
    buf: bytes | bytearray, max_head: int = MAX_HEAD, *, parser: Parser = "fast"
) -> tuple[RequestHead, int] | None:
    """Parse the request head at the start of ``buf``.

    None while the head is incomplete (and ``len(buf) <= max_head``); else ``(head, n)`` where
    ``buf[n:]`` is the body or pipelined data. Raises HttpError 400 (malformed or ambiguous),
    431 (no complete head within ``max_head`` bytes, or a complete head longer than that),
    501 (unsupported Transfer-Encoding) or 505 (HTTP version other than 1.0/1.1).
    """
    if parser == "fast":
        return _fast.parse_request(buf, max_head)
    if parser == "h11":
        return _h11.parse_request(buf, max_head)
    raise ValueError(f"unknown parser {parser!r}")


def parse_response_head(
    buf: bytes | bytearray,
    request_method: bytes,
    max_head: int = MAX_HEAD,
    *,
    parser: Parser = "fast",
) -> tuple[ResponseHead, int] | None:
    """Parse the response head at the start of ``buf`` (an answer to ``request_method``).

    Same contract as :func:`parse_request_head`; every error is HttpError(502). A 1xx other than
    101 is returned like any head: parse again after it for the final response. A 101 (and a 2xx
    to CONNECT) has no body and ``keep_alive`` False: the connection becomes a tunnel.
    """
    if parser == "fast":
        return _fast.parse_response(buf, request_method, max_head)
    if parser == "h11":
        return _h11.parse_response(buf, request_method, max_head)
    raise ValueError(f"unknown parser {parser!r}")
