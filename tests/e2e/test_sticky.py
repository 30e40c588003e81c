"""Sticky sessions with bounded loads (README "Balancing and affinity"): signed cookies, the
affinity table, the pool.

Pure parts in memory; one end-to-end test per hash key kind through a real lbproxy in
front of three reference backends at the default ``hash_balance_factor``.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from lbproxy.config.types import Address, BackendConfig, PoolConfig
from lbproxy.core.balance import AffinityTable, CookieSigner, cookie_secret
from lbproxy.core.pool import Pool
from tests.support import ENGINES, Backend, Lbproxy, free_port, wait_until
from tests.unit.test_config import problems_of, with_value


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Conn:
    """A proxied connection as the pool sees it."""

    def go_away(self) -> None:
        pass


def hash_pool(clock: Clock, n: int = 3, **options: object) -> Pool:
    backends = tuple(BackendConfig(f"b{i}", Address("127.0.0.1", 9000 + i)) for i in range(n))
    config = PoolConfig(name="main", balance="hash", backends=backends, **options)  # type: ignore[arg-type]
    return Pool(config, clock=clock)


# -- the signed cookie ---------------------------------------------------------------------------


def test_cookie_names_its_backend_and_cannot_be_forged() -> None:
    signer = CookieSigner(cookie_secret("a shared secret, 16+", "main"))
    value = signer.issue("nonce1", "b2")
    assert signer.read(value.encode()) == (b"nonce1", "b2")
    nonce, encoded, mac = value.split(".")
    other = signer.issue("nonce1", "b1").split(".")[1]
    for forged in (
        f"{nonce}.{other}.{mac}",  # another backend under the same MAC
        f"nonce2.{encoded}.{mac}",  # another nonce
        f"{nonce}.{encoded}.{mac[:-2]}AA",  # a changed MAC
        f"{nonce}.{encoded}",
        "user-42",
        "a.b.c.d",
        f"{nonce}.{encoded}.!!",
        "",
    ):
        assert signer.read(forged.encode()) is None, forged
    # another secret does not accept it; the same secret elsewhere (another instance) does
    assert CookieSigner(cookie_secret("another secret, 16+", "main")).read(value.encode()) is None
    assert CookieSigner(cookie_secret("a shared secret, 16+", "x")).read(value.encode()) is not None
    # without a secret the key comes from the pool name: the same on every instance
    assert cookie_secret("", "main") == cookie_secret("", "main") != cookie_secret("", "other")
    with pytest.raises(ValueError):
        signer.issue("has.dot", "b1")


# -- the affinity table --------------------------------------------------------------------------


def test_table_keeps_a_key_while_open_then_lingers_then_forgets() -> None:
    table = AffinityTable(linger=5.0)
    assert table.lookup(b"k", 0.0) is None
    first = table.opened(b"k", "b1", 0.0)
    second = table.opened(b"k", "b1", 1.0)
    table.closed(b"k", first, 2.0)
    assert table.lookup(b"k", 100.0) == "b1"  # one still open: no expiry however long
    table.closed(b"k", second, 100.0)
    assert table.lookup(b"k", 104.9) == "b1"  # lingering (a long-poll gap)
    assert table.lookup(b"k", 105.0) is None
    assert len(table) == 0


def test_table_moves_a_key_and_ignores_the_old_backends_closes() -> None:
    table = AffinityTable(linger=5.0)
    old = table.opened(b"k", "b1", 0.0)
    new = table.opened(b"k", "b2", 1.0)  # b1 was down: the key now lives on b2
    table.closed(b"k", old, 2.0)  # an old b1 connection closing does not count against b2
    assert table.lookup(b"k", 50.0) == "b2"
    again = table.opened(b"k", "b2", 51.0)
    table.closed(b"k", new, 52.0)
    table.closed(b"k", again, 52.0)
    assert table.lookup(b"k", 56.9) == "b2"
    assert table.lookup(b"k", 57.0) is None


def test_table_bounds_idle_entries_oldest_first_and_zero_linger_forgets_at_once() -> None:
    table = AffinityTable(linger=60.0, max_idle=3)
    open_one = table.opened(b"busy", "b1", 0.0)
    for i in range(5):
        table.closed(str(i).encode(), table.opened(str(i).encode(), "b1", float(i)), float(i))
    assert [table.lookup(str(i).encode(), 5.0) for i in range(5)] == [None, None, "b1", "b1", "b1"]
    assert table.lookup(b"busy", 5.0) == "b1" and len(table) == 4
    table.closed(b"busy", open_one, 6.0)
    assert len(table) == 3  # busy went idle and pushed the oldest out
    eager = AffinityTable(linger=0.0)
    eager.closed(b"k", eager.opened(b"k", "b1", 0.0), 0.0)
    assert eager.lookup(b"k", 0.0) is None


# -- the pool ------------------------------------------------------------------------------------


def test_an_open_key_stays_on_its_backend_at_the_default_factor() -> None:
    """The issue's repro: a websocket open with key K, then requests with K, more load elsewhere."""
    clock = Clock()
    pool = hash_pool(clock)
    assert pool.config.hash_balance_factor == 1.25
    first = pool.pick(b"user-42")
    assert first is not None
    pool.attach(first, Conn(), b"user-42")
    for i in range(20):  # 20 more connections with the same key: bounded loads would spread
        chosen = pool.pick(b"user-42")
        assert chosen is first, i
        pool.attach(chosen, Conn(), b"user-42")
    # other keys are still balanced by bounded loads around the hot one
    others = [pool.pick(f"other-{i}".encode()) for i in range(30)]
    assert {b.id for b in others if b is not None} == {b for b in pool.backends} - {first.id}


def test_a_closed_key_lingers_then_is_balanced_again() -> None:
    clock = Clock()
    pool = hash_pool(clock, affinity_linger=2.0)
    owner = pool.pick(b"k")
    assert owner is not None
    conn = Conn()
    pool.attach(owner, conn, b"k")
    hogs = [Conn() for _ in range(6)]
    for hog in hogs:
        pool.attach(owner, hog)  # unkeyed load on the owner: bounded loads would move k
    pool.detach(owner, conn)
    clock.now += 1.9  # between two long-polls
    assert pool.pick(b"k") is owner
    clock.now += 0.2
    assert pool.pick(b"k") is not owner  # forgotten: bounded loads decide again


def test_a_remembered_backend_that_is_down_or_draining_is_picked_again() -> None:
    clock = Clock()
    pool = hash_pool(clock)
    owner = pool.pick(b"k")
    assert owner is not None
    pool.attach(owner, Conn(), b"k")
    pool.mark_down(owner.id, "test")
    moved = pool.pick(b"k")
    assert moved is not None and moved is not owner
    pool.attach(moved, Conn(), b"k")
    pool.mark_up(owner.id, "test")
    assert pool.pick(b"k") is moved  # the key now lives where it was moved to
    pool.drain(moved.id)
    assert pool.pick(b"k") not in (moved, None)
    assert pool.pick(b"k", exclude={owner.id}) not in (moved, owner, None)


def test_sticky_cookie_is_issued_followed_and_reissued_when_its_backend_is_down() -> None:
    clock = Clock()
    pool = hash_pool(clock, sticky_secret="0123456789abcdef")
    value = pool.sticky_cookie(None)
    assert value is not None
    chosen = pool.pick(value.encode())
    assert chosen is not None
    for _ in range(10):  # load on its backend does not move a signed cookie
        pool.attach(chosen, Conn(), value.encode())
    assert pool.pick(value.encode()) is chosen
    assert pool.sticky_cookie(value.encode()) is None  # valid, backend up: nothing to set
    assert pool.sticky_cookie(b"user-42") is None  # a client's own value: never replaced
    # another instance with the same secret agrees without any shared table
    assert hash_pool(Clock(), sticky_secret="0123456789abcdef").pick(value.encode()).id == chosen.id  # type: ignore[union-attr]
    pool.mark_down(chosen.id, "test")
    fresh = pool.sticky_cookie(value.encode())
    assert fresh is not None and fresh.split(".")[0] == value.split(".")[0]  # same nonce
    moved = pool.pick(fresh.encode())
    assert moved is not None and moved is not chosen
    assert pool.pick(value.encode()) is not chosen  # the old cookie: picked again


def test_a_cookie_whose_backend_failed_follows_where_its_nonce_went() -> None:
    """Socket.IO after a node died: the reconnect went elsewhere before the node was marked
    down; the session's next requests (same old cookie) must reach that same backend."""
    clock = Clock()
    pool = hash_pool(clock, n=5, sticky_secret="0123456789abcdef")
    value = pool.sticky_cookie(None)
    assert value is not None
    dead = pool.pick(value.encode())
    assert dead is not None
    elsewhere = pool.pick(value.encode(), exclude={dead.id})  # its connect was refused
    assert elsewhere is not None and elsewhere is not dead
    pool.attach(elsewhere, Conn(), value.encode())
    for i in range(8):  # load everywhere else changes what bounded loads would say
        pool.attach(elsewhere, Conn(), f"load-{i}".encode())
    for _ in range(5):
        assert pool.pick(value.encode(), exclude={dead.id}) is elsewhere
    pool.mark_down(dead.id, "passive failures")
    fresh = pool.sticky_cookie(value.encode())
    assert fresh is not None and pool.pick(fresh.encode()) is elsewhere


def test_a_forged_cookie_is_a_plain_key() -> None:
    clock = Clock()
    pool = hash_pool(clock, sticky_secret="0123456789abcdef")
    forger = CookieSigner(cookie_secret("not the pool's secret", "main"))
    for target in ("b0", "b1", "b2"):
        forged = forger.issue("n", target).encode()
        assert pool.sticky_cookie(forged) is None
        first = pool.pick(forged)
        assert first is not None
        pool.attach(first, Conn(), forged)  # remembered like any client key
        assert pool.pick(forged) is first
    # where a forged value lands is its hash's business, not the backend it names
    fresh = hash_pool(clock, sticky_secret="0123456789abcdef")
    owners = {fresh.pick(forger.issue(f"n{i}", "b0").encode()).id for i in range(30)}  # type: ignore[union-attr]
    assert owners == {"b0", "b1", "b2"}


@pytest.mark.parametrize(
    ("key", "value", "line"),
    [
        (
            "sticky_secret",
            "short",
            "pools.chat.sticky_secret: must be at least 16 characters, got 5",
        ),
        ("sticky_secret", 7, "pools.chat.sticky_secret: must be a string, got 7"),
        (
            "affinity_linger",
            -1,
            "pools.chat.affinity_linger: must be a non-negative number, got -1",
        ),
    ],
)
def test_config_errors(key: str, value: object, line: str) -> None:
    assert problems_of(with_value(("pools", "chat", key), value)) == [f"conf.toml: {line}"]


# -- end to end: websocket open, then HTTP requests with the same key -> same backend -------------


KINDS = {  # name: (hash_key, request headers, query, tunnel engine)
    "sticky-cookie": ("cookie:lbid", {}, "", "native"),
    "client-cookie": ("cookie:lbid", {"Cookie": "lbid=user-42"}, "", "native"),
    "ip": ("ip", {}, "", "native"),
    "ip-python-tunnel": ("ip", {}, "", "python"),
    "header": ("header:x-user", {"X-User": "user-42"}, "", "native"),
    "query": ("query:room", {}, "?room=r42", "native"),
}


def multi_config(backends: list[Backend], kinds: list[str]) -> tuple[str, dict[str, int]]:
    """One lbproxy, one listener and hash pool (default factor) per kind: (TOML, ports)."""
    ports = {kind: free_port() for kind in kinds}
    lines = ["[admin]", f'listen = "127.0.0.1:{free_port()}"']
    for n, kind in enumerate(kinds):
        lines += ["", f"[listeners.l{n}]", f'bind = "127.0.0.1:{ports[kind]}"', f'pool = "p{n}"']
        lines += ["", f"[pools.p{n}]", 'balance = "hash"', f'hash_key = "{KINDS[kind][0]}"']
        lines += ["backends = ["]
        lines += [f'  {{ id = "{b.id}", address = "{b.address}" }},' for b in backends]
        lines += ["]", "", f"[pools.p{n}.health]", 'check = "none"']
    return "\n".join(lines) + "\n", ports


@pytest.fixture(scope="module")
def ports(
    backends: list[Backend], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, int]]:
    """Two lbproxy processes: the native engine (most kinds) and the Python tunnel."""
    found: dict[str, int] = {}
    running: list[Lbproxy] = []
    try:
        for engine in ENGINES:
            kinds = [kind for kind, spec in KINDS.items() if spec[3] == engine]
            text, kind_ports = multi_config(backends, kinds)
            proxy = Lbproxy(text, tmp_path_factory.mktemp(engine), engine=engine)
            running.append(proxy.start(wait_ports=tuple(kind_ports.values())))
            found.update(kind_ports)
        yield found
    finally:
        for proxy in running:
            proxy.stop()


def open_websockets(backends: list[Backend]) -> dict[str, int]:
    return {b.id: httpx.get(f"http://{b.address}/whoami").json()["connections"] for b in backends}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(KINDS))
def test_websocket_then_requests_with_the_same_key_stay(
    backends: list[Backend], ports: dict[str, int], kind: str
) -> None:
    _, headers, query, _ = KINDS[kind]
    port = ports[kind]
    wait_until(lambda: sum(open_websockets(backends).values()) == 0)  # (the last test's closed)
    with ws_connect(f"ws://127.0.0.1:{port}/echo{query}", additional_headers=headers) as ws:
        cookie = ws.response.headers.get("Set-Cookie")
        assert (cookie is not None) == (kind == "sticky-cookie")
        sent = dict(headers)
        if cookie is not None:
            sent["Cookie"] = cookie.split(";")[0]
        owner = [b for b, n in open_websockets(backends).items() if n == 1]
        assert len(owner) == 1
        with httpx.Client(timeout=5) as client:
            seen = [
                client.get(f"http://127.0.0.1:{port}/whoami{query}", headers=sent).json()["id"]
                for _ in range(8)
            ]
        assert seen == owner * 8
