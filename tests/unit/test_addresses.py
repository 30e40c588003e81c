"""The one HOST:PORT parser (lbproxy/addresses.py) and its two callers' rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.addresses import parse_address
from lbproxy.config import load as config
from lbproxy.config.types import Address
from lbproxy.registry import schema as registry_schema


def test_both_callers_use_the_one_parser() -> None:
    assert config.parse_address is parse_address
    assert registry_schema.parse_address("[::1]:80") == parse_address("[::1]:80")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", Address("127.0.0.1", 80)),
        ("localhost:0", Address("localhost", 0)),
        ("[::1]:65535", Address("::1", 65535)),
        ("[fe80::1%eth0]:8080", Address("fe80::1%eth0", 8080)),
        ("backend_1.internal-zone:9001", Address("backend_1.internal-zone", 9001)),
    ],
)
def test_accepts(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not HOST:PORT: ''"),
        ("host", "not HOST:PORT: 'host'"),
        (":80", "not HOST:PORT: ':80'"),
        ("host:", "not HOST:PORT: 'host:'"),
        ("host:+80", "not HOST:PORT: 'host:+80'"),
        ("host:\u0668\u0660", "not HOST:PORT: 'host:\u0668\u0660'"),  # Arabic-Indic "80"
        ("::1:80", "not HOST:PORT: '::1:80'"),
        ("[::1]80", "not HOST:PORT: '[::1]80'"),
        ("[::1]x:80", "not HOST:PORT: '[::1]x:80'"),
        ("a b:1", "not HOST:PORT: 'a b:1'"),
        ("user@host:80", "not HOST:PORT: 'user@host:80'"),
        ("h\u00e9:80", "not HOST:PORT: 'h\u00e9:80'"),
        ("ex%41mple:80", "not HOST:PORT: 'ex%41mple:80'"),
        ("[zz]:80", "not an IPv6 address in brackets: '[zz]:80'"),
        ("[10.0.0.1]:80", "not an IPv6 address in brackets: '[10.0.0.1]:80'"),
        ("host:65536", "port must be 0..65535: 'host:65536'"),
    ],
)
def test_rejects_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert str(info.value) == message


def test_port_zero_only_where_it_means_any_free_port() -> None:
    assert parse_address("127.0.0.1:0") == Address("127.0.0.1", 0)
    with pytest.raises(ValueError, match=r"port must be 1\.\.65535: 'host:0'"):
        parse_address("host:0", port_zero=False)
    with pytest.raises(ValueError, match=r"port must be 1\.\.65535: 'host:65536'"):
        parse_address("host:65536", port_zero=False)
    assert parse_address("host:1", port_zero=False) == Address("host", 1)


@pytest.mark.parametrize("text", ["host:0", "[::1]:0"])
def test_a_registered_address_needs_a_real_port(text: str) -> None:
    assert parse_address(text).port == 0
    with pytest.raises(ValueError, match=r"port must be 1\.\.65535"):
        registry_schema.parse_address(text)


@settings(max_examples=80, deadline=None)
@given(
    host=st.one_of(
        st.ip_addresses().map(str), st.from_regex(r"[A-Za-z0-9_.-]{1,30}", fullmatch=True)
    ),
    port=st.integers(0, 65535),
)
def test_round_trips_through_str(host: str, port: int) -> None:
    address = Address(host, port)
    assert parse_address(str(address)) == address
    if port:
        assert registry_schema.parse_address(str(address)) == address
