"""Affinity keys: parsing ``hash_key`` and extracting the key from a request."""

from __future__ import annotations

import string
from collections.abc import Sequence
from urllib.parse import quote, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.core.balance import (
    HashKeySpec,
    extract_key,
    get_cookie,
    new_sticky_value,
    parse_hash_key,
)

TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# RFC 6265 cookie-octet: printable ASCII except space, '"', ',', ';' and '\'.
COOKIE_OCTETS = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in '",;\\')


def key(
    spec: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    target: bytes = b"/",
    ip: str = "10.0.0.9",
) -> bytes | None:
    return extract_key(parse_hash_key(spec), ip, headers, target)


# -- parse_hash_key ---------------------------------------------------------


def test_parse_each_kind() -> None:
    assert parse_hash_key("ip") == HashKeySpec("ip", "")
    assert parse_hash_key("cookie:SessionID") == HashKeySpec("cookie", "SessionID")
    assert parse_hash_key("header:X-User-ID") == HashKeySpec("header", "x-user-id")
    assert parse_hash_key("query:user") == HashKeySpec("query", "user")
    assert parse_hash_key("query:nom_d'usager") == HashKeySpec("query", "nom_d'usager")
    assert parse_hash_key("query:été") == HashKeySpec("query", "été")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown kind ''"),
        ("IP", "unknown kind 'IP'"),
        ("body:x", "unknown kind 'body'"),
        ("ip:x", "'ip' takes no name"),
        ("cookie", "cookie needs a name"),
        ("header:", "header needs a name"),
        ("query:", "query needs a name"),
        ("cookie:a b", "invalid cookie name: ' '"),
        ("cookie:sid;x", "invalid cookie name: ';'"),
        ("header:X:Y", "invalid header name: ':'"),
        ("header:été", "invalid header name"),
        ("query:a=b", "invalid query parameter name: '='"),
        ("query:a&b", "invalid query parameter name: '&'"),
        ("query:a b", "invalid query parameter name: ' '"),
    ],
)
def test_parse_errors_are_clear(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"expected|takes no name|needs a name|not allowed") as err:
        parse_hash_key(spec)
    assert message in str(err.value)
    assert repr(spec) in str(err.value)


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(["cookie", "header"]), name=st.text(TOKEN, min_size=1))
def test_any_token_name_is_accepted(kind: str, name: str) -> None:
    spec = parse_hash_key(f"{kind}:{name}")
    assert spec.kind == kind
    assert spec.name == (name.lower() if kind == "header" else name)


@settings(max_examples=100, deadline=None)
@given(name=st.text(min_size=1).filter(lambda s: any(c not in TOKEN for c in s)))
def test_non_token_names_are_rejected(name: str) -> None:
    for kind in ("cookie", "header"):
        with pytest.raises(ValueError, match="not allowed"):
            parse_hash_key(f"{kind}:{name}")


# -- ip and header ----------------------------------------------------------


def test_ip_key() -> None:
    assert key("ip", ip="192.0.2.7") == b"192.0.2.7"
    assert key("ip", ip="2001:db8::1") == b"2001:db8::1"
    assert key("ip", ip="") is None


def test_header_key_first_occurrence_stripped() -> None:
    headers = [(b"host", b"x"), (b"x-user", b"  alice \t"), (b"x-user", b"bob")]
    assert key("header:X-User", headers) == b"alice"
    assert key("header:x-other", headers) is None
    assert key("header:x-user", [(b"x-user", b"   ")]) is None  # empty: fall back to IP


# -- cookies ----------------------------------------------------------------


def test_cookie_in_one_header() -> None:
    headers = [(b"cookie", b"theme=dark; sid=abc123; lang=en")]
    assert key("cookie:sid", headers) == b"abc123"
    assert key("cookie:theme", headers) == b"dark"
    assert key("cookie:lang", headers) == b"en"


def test_cookie_across_several_headers() -> None:
    headers = [(b"cookie", b"a=1; b=2"), (b"accept", b"*/*"), (b"cookie", b"sid=xyz; c=3")]
    assert key("cookie:sid", headers) == b"xyz"
    assert key("cookie:c", headers) == b"3"
    assert key("cookie:a", [*headers, (b"cookie", b"a=later")]) == b"1"  # first wins


def test_cookie_quotes_whitespace_and_case() -> None:
    assert key("cookie:sid", [(b"cookie", b'sid="quoted value"')]) == b"quoted value"
    assert key("cookie:sid", [(b"cookie", b'sid=""')]) is None
    assert get_cookie([(b"cookie", b'sid=""')], "sid") == b""
    assert key("cookie:sid", [(b"cookie", b'sid="')]) == b'"'  # a lone quote is kept
    assert key("cookie:sid", [(b"cookie", b"  a=1 ;   sid = v1  ;b=2")]) == b"v1"
    assert key("cookie:SID", [(b"cookie", b"sid=lower")]) is None  # names are case-sensitive
    assert key("cookie:sid", [(b"cookie", b"xsid=1; sidx=2; sid=3")]) == b"3"
    assert key("cookie:sid", [(b"cookie", b"sid=a=b")]) == b"a=b"  # only the first '=' splits


def test_cookie_missing() -> None:
    assert key("cookie:sid", []) is None
    assert key("cookie:sid", [(b"cookie", b"other=1")]) is None
    assert key("cookie:sid", [(b"cookie", b"sid")]) is None  # no '=': not a pair
    assert key("cookie:sid", [(b"x-cookie", b"sid=1")]) is None
    assert get_cookie([(b"cookie", b"sid=")], "sid") == b""
    assert key("cookie:sid", [(b"cookie", b"sid=")]) is None


@settings(max_examples=100, deadline=None)
@given(
    jar=st.dictionaries(
        st.text(TOKEN.replace("=", ""), min_size=1, max_size=8),
        st.text(COOKIE_OCTETS, max_size=12),
        min_size=1,
        max_size=6,
    ),
    split=st.integers(0, 6),
    quote_values=st.booleans(),
)
def test_cookie_round_trip(jar: dict[str, str], split: int, quote_values: bool) -> None:
    pairs = [f'{n}="{v}"' if quote_values else f"{n}={v}" for n, v in jar.items()]
    headers = [
        (b"cookie", "; ".join(part).encode()) for part in (pairs[:split], pairs[split:]) if part
    ]
    for name, value in jar.items():
        assert get_cookie(headers, name) == value.encode()


# -- query ------------------------------------------------------------------


def test_query_key() -> None:
    assert key("query:user", target=b"/chat?user=alice&room=b") == b"alice"
    assert key("query:room", target=b"/chat?user=alice&room=b") == b"b"
    assert key("query:user", target=b"/chat?user=al%20ice%2B1") == b"al ice+1"
    assert key("query:user", target=b"/chat?user=al+ice") == b"al ice"
    assert key("query:user", target=b"/chat?user=%C3%A9t%C3%A9") == "été".encode()
    assert key("query:été", target=b"/c?%C3%A9t%C3%A9=x") == b"x"  # encoded name
    assert key("query:user", target=b"/chat?user=first&user=second") == b"first"
    assert key("query:user", target=b"/chat?user=v#frag") == b"v"
    assert key("query:user", target=b"http://example.com/chat?a=1&user=abs") == b"abs"
    assert key("query:user", target=b"/chat?user=bad%zz") == b"bad%zz"  # kept as sent


def test_query_missing() -> None:
    assert key("query:user", target=b"/chat") is None
    assert key("query:user", target=b"/chat?") is None
    assert key("query:user", target=b"/chat?users=x&xuser=y") is None
    assert key("query:user", target=b"/chat?user") is None  # no value: fall back to IP
    assert key("query:user", target=b"/chat?user=") is None
    assert key("query:user", target=b"/chat#?user=x") is None


@settings(max_examples=100, deadline=None)
@given(
    params=st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=12)), max_size=6),
    name=st.text(min_size=1, max_size=8).filter(
        lambda n: n.isprintable() and not any(c in "&=#?" or c.isspace() for c in n)
    ),
    value=st.text(min_size=1, max_size=12),
    plus_for_space=st.booleans(),
)
def test_query_round_trip(
    params: list[tuple[str, str]], name: str, value: str, plus_for_space: bool
) -> None:
    """Whatever a client encodes (form or percent style), the first value comes back."""
    encoder = {} if plus_for_space else {"quote_via": quote}
    rest = [(n, v) for n, v in params if n != name]
    query = urlencode([*rest, (name, value), (name, "later")], **encoder)  # type: ignore[arg-type]
    target = f"/chat?{query}".encode()
    assert key(f"query:{name}", target=target) == value.encode("utf-8")


# -- sticky cookie values ---------------------------------------------------


def test_new_sticky_value() -> None:
    values = {new_sticky_value() for _ in range(50)}
    assert len(values) == 50
    for value in values:
        assert len(value) == 22  # 16 random bytes, base64url without padding
        assert set(value) <= set(string.ascii_letters + string.digits + "-_")
        # It is a valid cookie value and survives the round trip.
        assert get_cookie([(b"cookie", f"sid={value}".encode())], "sid") == value.encode()
