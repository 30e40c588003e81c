"""Pure parts of the registry: keys, parsing, allowed networks, URL redaction, backoff."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.config.types import Address
from lbproxy.errors import RegistryError
from lbproxy.registry.register import redact_url
from lbproxy.registry.schema import (
    address_allowed,
    backend_key,
    backoff_delay,
    check_url,
    events_channel,
    members_key,
    parse_address,
    parse_entry,
    parse_event,
    parse_snapshot,
    scrub,
)


def test_key_layout() -> None:
    assert members_key("lbproxy", "chat") == "lbproxy:pool:chat:members"
    assert backend_key("lbproxy", "chat", "b1") == "lbproxy:pool:chat:backend:b1"
    assert events_channel("p") == "p:events"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9001", Address("127.0.0.1", 9001)),
        ("[::1]:80", Address("::1", 80)),
        ("backend.local:65535", Address("backend.local", 65535)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    "text",
    ["", "host", ":80", "host:0", "host:70000", "host:x", "::1:80", "[::1]80", "[zz]:80", "a b:1"],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(min_value=1, max_value=65535),
)
@settings(max_examples=60, deadline=None)
def test_parse_address_roundtrip(ip: ipaddress._BaseAddress, port: int) -> None:
    address = Address(str(ip), port)
    assert parse_address(str(address)) == address


def test_parse_entry_valid_and_defaults() -> None:
    entry = parse_entry("b1", 12.5, {"address": "10.0.0.1:80", "meta:zone": "a", "other": "x"})
    assert (entry.id, entry.address, entry.weight, entry.draining) == (
        "b1",
        Address("10.0.0.1", 80),
        1,
        False,
    )
    assert entry.expiry == 12.5
    assert entry.meta == (("zone", "a"),)
    drained = parse_entry("b1", 1.0, {"address": "10.0.0.1:80", "state": "draining", "weight": "7"})
    assert drained.draining and drained.weight == 7


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"address": "nope"},
        {"address": "10.0.0.1:80", "weight": "0"},
        {"address": "10.0.0.1:80", "weight": "1001"},
        {"address": "10.0.0.1:80", "weight": "-1"},
        {"address": "10.0.0.1:80", "state": "down"},
        {"address": "10.0.0.1:80", "id": "other"},
    ],
)
def test_parse_entry_rejects(fields: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        parse_entry("b1", 1.0, fields)


def test_parse_entry_rejects_bad_id() -> None:
    with pytest.raises(ValueError):
        parse_entry("has space", 1.0, {"address": "10.0.0.1:80"})


def test_parse_snapshot() -> None:
    reply = [
        "100",
        "250000",
        "good",
        "106.5",
        ["address", "10.0.0.1:80", "weight", "2", "state", "up"],
        "nohash",
        "107",
        [],
        "bad",
        "108",
        ["address", "10.0.0.1:80", "state", "weird"],
    ]
    snapshot = parse_snapshot(reply)
    assert snapshot.server_time == 100.25
    assert [(e.id, e.weight, e.expiry) for e in snapshot.entries] == [("good", 2, 106.5)]
    assert [m for m, _ in snapshot.malformed] == ["nohash", "bad"]


def test_address_allowed() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert address_allowed(Address("10.1.2.3", 80), nets)
    assert address_allowed(Address("fd00::5", 80), nets)
    assert address_allowed(Address("::ffff:10.0.0.1", 80), nets)
    assert not address_allowed(Address("127.0.0.1", 80), nets)
    assert not address_allowed(Address("localhost", 80), nets)  # never resolved
    assert not address_allowed(Address("::1", 80), nets)
    assert address_allowed(Address("anything", 80), ())


def test_parse_event() -> None:
    assert parse_event('{"event":"join","pool":"chat","id":"b1"}') == ("join", "chat", "b1")
    for bad in ["nope", "[]", '{"event":"join","pool":1,"id":"b1"}', '{"pool":"chat"}']:
        with pytest.raises(ValueError):
            parse_event(bad)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://u:p%40ss@h:1/2?ssl_cert_reqs=none", "rediss://u:***@h:1/2?ssl_cert_reqs=none"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host:6379/0", "redis://user@host:6379/0"),
        ("unix:///tmp/r.sock?db=0&password=secret", "unix:///tmp/r.sock?db=0&password=***"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


_secret = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="@/?#%[]"),
    min_size=4,
    max_size=20,
)


@given(user=st.sampled_from(["", "app", "default"]), password=_secret)
@settings(max_examples=80, deadline=None)
def test_redact_url_never_shows_the_password(user: str, password: str) -> None:
    url = f"redis://{user}:{password}@10.0.0.1:6379/0"
    redacted = redact_url(url)
    assert password not in redacted.replace("***", "")
    assert redacted == f"redis://{user}:***@10.0.0.1:6379/0"
    assert password not in scrub(f"error talking to {url}", url)


def test_check_url() -> None:
    for url in ["redis://h:1/0", "rediss://h:1/0", "unix:///tmp/x.sock"]:
        check_url(url)
    for url in ["redis+sentinel://u:secret@h:26379/m", "http://h", "h:6379"]:
        with pytest.raises(RegistryError) as info:
            check_url(url)
        assert "secret" not in str(info.value)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, 0.2, 5.0, rng) for n in range(12)]
    assert 0.1 <= delays[0] <= 0.2
    assert 0.2 <= delays[1] <= 0.4
    assert all(2.5 <= d <= 5.0 for d in delays[6:])
    assert len({round(d, 6) for d in delays[6:]}) > 1  # jittered, not fixed
