"""Fast lanes: recognise the most common heads with one regular-expression match.

The proxy parses every request, but most keep-alive traffic is the same shape: a
bodiless HTTP/1.1 GET with no hop-by-hop or forwarding headers, answered with a
Content-Length response. For those, building a RequestHead/ResponseHead and
re-serialising the head costs more than the proxying itself. These functions say
"this head is exactly that simple shape" (the full parser would accept it, find no
body, keep-alive, not a websocket) or "ask the full parser" — they never reject
anything themselves. The tests check them against the full parser.
"""

from __future__ import annotations

import re

from lbproxy.core.http1._common import LANE_HOST

# A request line for GET, then header lines whose names are tokens other than the
# ones that change framing, connection handling or forwarding (those go to the full
# parser), then the blank line. Values: any byte but controls (HTAB allowed).
# (possessive: a name never holds ":", a value never CR or LF, so giving back characters
# can never make a match; sre then does not keep the positions to backtrack to)
_NAME = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]++"
_TEXT = rb"[^\x00-\x08\x0a-\x1f\x7f]*+"  # a field value: no controls but HTAB
# (alternatives factored by prefix: sre tries them one by one on every header line)
_FORBIDDEN_REST = (
    rb"t(?:e|railer|ransfer-encoding)|keep-alive|proxy-connection"
    rb"|x-(?:forwarded-(?:for|proto|port)|real-ip)|expect|forwarded"
)
_FORBIDDEN = rb"content-length|" + _FORBIDDEN_REST
_HEADER = (
    rb"(?!(?i:c(?:ontent-length|onnection)|"
    + _FORBIDDEN_REST
    + rb"|upgrade|host)[ \t]*:)"
    + _NAME
    + rb":"
    + _TEXT
    + rb"\r\n"
)
# Websocket upgrades, in one match over the head in lower case (GET and HTTP/1.1 are then
# checked on the head itself): header lines other than the forbidden ones, and exactly one
# each of "host: HOST" (a value quick_request's Host takes), "upgrade: websocket" and
# "connection: upgrade" (a second one fails at "(?(N)(?!))": its group is set already; the
# final CRLF needs all three). One match instead of a match, three counts, three finds and
# a Host match (each call costs more than the bytes it looks at); in lower case the names
# are plain literals, which sre's alternation tests by their first byte alone.
_WS_OTHER = (
    rb"(?!(?:" + _FORBIDDEN + rb"|host|upgrade|connection)[ \t]*:)" + _NAME.lower() + rb":" + _TEXT
)
_QUICK_WEBSOCKET = re.compile(
    rb"get /[\x21-\x7e]*+ http/1\.1\r\n(?:(?:"
    rb"host: (?(1)(?!))()[ \t]*+" + LANE_HOST + rb"[ \t]*+"
    rb"|upgrade: (?(2)(?!))()websocket"
    rb"|connection: (?(3)(?!))()upgrade"
    rb"|" + _WS_OTHER + rb")\r\n)++(?(1)(?(2)(?(3)\r\n|(?!))|(?!))|(?!))"
)
# (possessive lines: a name holds no CR, so a header line never swallows the final CRLF;
# sre then keeps no marks to backtrack to, ~10 % fewer instructions per 101)
_SWITCHING = re.compile(
    rb"HTTP/1\.1 101(?: " + _TEXT + rb")?\r\n(?:" + _NAME + rb":" + _TEXT + rb"\r\n)*+\r\n"
)
_VALUE = rb"[ \t]*+" + LANE_HOST + rb"[ \t]*+"  # a valid, non-empty Host
# (possessive repeats of whole lines too: every line ends at its CRLF, and the line a
# group stops at, Host or Content-Length or the blank one, is one the group refuses, so
# giving lines back can never make a match)
_QUICK_REQUEST = re.compile(
    rb"GET /[\x21-\x7e]*+ HTTP/1\.1\r\n"
    rb"(?:" + _HEADER + rb")*+"
    rb"[Hh][Oo][Ss][Tt]:" + _VALUE + rb"\r\n"
    rb"(?:" + _HEADER + rb")*+"
    rb"\r\n"
)
# A response header line other than Content-Length, Transfer-Encoding and Connection (the
# value class takes blanks too: no separate leading [ \t]*).
_RESPONSE_LINE = (
    rb"(?:(?!(?i:c(?:ontent-length|onnection)|transfer-encoding)[ \t]*:)"
    rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]++:" + _TEXT + rb"\r\n)*+"
)
_QUICK_RESPONSE = re.compile(
    rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: "
    + _TEXT
    + rb")?+\r\n"
    + _RESPONSE_LINE
    + rb"(?i:content-length):[ \t]*+([0-9]{1,15})[ \t]*+\r\n"
    + _RESPONSE_LINE
    + rb"\r\n"
)


# The two per-request matches as bound methods, for the proxy's keep-alive path (no Python
# call around them): a match object or None; quick_response's 204/304 rule is the caller's.
match_quick_request = _QUICK_REQUEST.fullmatch
match_quick_response = _QUICK_RESPONSE.fullmatch


def quick_request(head: bytes) -> bool:
    """True when ``head`` (a whole request head, CRLFCRLF included) is a plain GET.

    That is: HTTP/1.1, origin-form target, exactly one Host, no body, keep-alive, not
    a websocket, and no header the proxy would drop or rewrite — so it can be sent on
    as ``head[:-2]`` followed by the X-Forwarded-* lines and CRLF.
    """
    return _QUICK_REQUEST.fullmatch(head) is not None


def quick_websocket(head: bytes) -> bool:
    """True when ``head`` is a plain websocket upgrade the proxy can forward as it is.

    GET, HTTP/1.1, origin-form, exactly one Host, exactly one ``Upgrade: websocket``
    and one ``Connection: Upgrade`` (as browsers and most clients send them), no body
    and no header the proxy would drop or rewrite: forwarded as ``head[:-2]`` plus
    the X-Forwarded-* lines and CRLF.
    """
    low = head.lower()
    return (
        _QUICK_WEBSOCKET.fullmatch(low) is not None
        and head.startswith(b"GET /")  # (the lower-case match took any case of these two)
        and head.startswith(b"HTTP/1.1", low.find(b"\r\n") - 8)
    )


def switching_protocols(head: bytes) -> bool:
    """True when ``head`` is a well-formed ``101 Switching Protocols`` response head."""
    return _SWITCHING.fullmatch(head) is not None


def quick_response(head: bytes) -> tuple[int, int] | None:
    """(status, content length) when ``head`` is a plain keep-alive Content-Length response.

    None means: use the full parser (chunked, close-delimited, 1xx/204/304, Connection
    headers, anything unusual). The caller must not use this for responses to HEAD.
    """
    match = _QUICK_RESPONSE.fullmatch(head)
    if match is None:
        return None
    status = int(match.group(1))
    if status == 204 or status == 304:
        return None
    return status, int(match.group(2))
