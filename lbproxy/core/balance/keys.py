"""Affinity keys: which part of a request the consistent hash is computed from.

``hash_key`` in a pool's config is ``ip``, ``cookie:NAME``, ``header:NAME`` or
``query:NAME``. A request that lacks the named part (or has it empty) yields ``None`` and
the caller falls back to the client IP.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_to_bytes

KeyKind = Literal["ip", "cookie", "header", "query"]

_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
"""RFC 9110 ``tchar``: what header and cookie names are made of."""
_QUERY_NAME_FORBIDDEN = frozenset("&=#?")
_EXPECTED = "expected 'ip', 'cookie:NAME', 'header:NAME' or 'query:NAME'"
_OWS = b" \t"


@dataclass(frozen=True, slots=True)
class HashKeySpec:
    kind: KeyKind
    name: str  # "" for ip; cookie name (case-sensitive); lower-cased header name; query name


def parse_hash_key(spec: str) -> HashKeySpec:
    """Parse a ``hash_key`` setting; ``ValueError`` with a readable message when invalid."""
    if spec == "ip":
        return HashKeySpec("ip", "")
    kind, _, name = spec.partition(":")
    if kind == "ip":
        raise ValueError(f"hash_key {spec!r}: 'ip' takes no name")
    if kind not in ("cookie", "header", "query"):
        raise ValueError(f"hash_key {spec!r}: unknown kind {kind!r}; {_EXPECTED}")
    if not name:
        raise ValueError(f"hash_key {spec!r}: {kind} needs a name ({kind}:NAME)")
    if kind == "query":
        bad = sorted(
            {c for c in name if c in _QUERY_NAME_FORBIDDEN or c.isspace() or not c.isprintable()}
        )
        if bad:
            shown = ", ".join(repr(c) for c in bad)
            raise ValueError(
                f"hash_key {spec!r}: invalid query parameter name: {shown} not allowed "
                "(give the decoded name)"
            )
        return HashKeySpec("query", name)
    bad = sorted({c for c in name if c not in _TOKEN_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(
            f"hash_key {spec!r}: invalid {kind} name: {shown} not allowed "
            "(a token: letters, digits and !#$%&'*+-.^_`|~)"
        )
    if kind == "header":
        return HashKeySpec("header", name.lower())
    return HashKeySpec("cookie", name)


def get_cookie(headers: Sequence[tuple[bytes, bytes]], name: str) -> bytes | None:
    """Value of cookie ``name`` (case-sensitive) across all Cookie headers, first wins.

    ``headers`` carry lower-cased names. Pairs are split on ``;``, whitespace around names
    and values is ignored and one pair of surrounding double quotes is removed (RFC 6265
    section 5.4). Returns ``b""`` for a cookie that is present but empty, ``None`` if absent.
    """
    wanted = name.encode("utf-8")
    for header_name, value in headers:
        if header_name != b"cookie" or wanted not in value:
            continue
        for pair in value.split(b";"):
            pair_name, sep, pair_value = pair.partition(b"=")
            if sep and pair_name.strip(_OWS) == wanted:
                pair_value = pair_value.strip(_OWS)
                if len(pair_value) >= 2 and pair_value[0] == 0x22 and pair_value[-1] == 0x22:
                    pair_value = pair_value[1:-1]
                return pair_value
    return None


def _header(headers: Sequence[tuple[bytes, bytes]], name: str) -> bytes | None:
    wanted = name.encode("ascii")
    for header_name, value in headers:
        if header_name == wanted:
            return value.strip(_OWS)
    return None


def _form_decode(raw: bytes) -> bytes:
    """Percent-decode a query component, ``+`` meaning space (as browsers encode forms)."""
    if raw.find(b"%") < 0 and raw.find(b"+") < 0:  # (find: "in" on bytes raises inside)
        return raw
    return unquote_to_bytes(raw.replace(b"+", b" "))


def query_param(target: bytes, name: str) -> bytes | None:
    """Percent-decoded value of the first ``name`` parameter of a request-target."""
    query = target.partition(b"#")[0].partition(b"?")[2]
    if not query:
        return None
    wanted = name.encode("utf-8")
    for part in query.split(b"&"):
        raw_name, _, raw_value = part.partition(b"=")
        if _form_decode(raw_name) == wanted:
            return _form_decode(raw_value)
    return None


def extract_key(
    spec: HashKeySpec, client_ip: str, headers: Sequence[tuple[bytes, bytes]], target: bytes
) -> bytes | None:
    """The affinity key of a request, or ``None`` when the request lacks it (or it is empty)."""
    value: bytes | None
    if spec.kind == "ip":
        value = client_ip.encode("utf-8")
    elif spec.kind == "cookie":
        value = get_cookie(headers, spec.name)
    elif spec.kind == "header":
        value = _header(headers, spec.name)
    else:
        value = query_param(target, spec.name)
    return value or None


def new_sticky_value() -> str:
    """A fresh unguessable value for a sticky cookie (128 random bits, URL-safe)."""
    return secrets.token_urlsafe(16)
