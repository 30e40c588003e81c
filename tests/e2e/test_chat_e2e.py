"""The chat pattern end to end THROUGH a real `lbproxy serve` (redis discovery, hash affinity).

Real processes: a redis-server, three self-registering reference backends and one lbproxy.
Users are placed on backends by the affinity key (``hash_key = "query:user"``); the ``joined``
event names the backend that serves a connection. The backends run ``run_backend`` (what
``lbproxy backend --redis`` runs) with options the CLI does not expose: no rate limit (1,000
messages would otherwise take 25 s at 20/s per user) and a 2 s presence / registration TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, WebSocketException

from lbproxy.config.types import Address
from tests.support import Lbproxy, Proc, RedisServer, free_port, wait_until
from tests.support.backend import ChatClient, healthz

pytestmark = pytest.mark.timeout(120)

PREFIX = "chate2e"
PRESENCE_TTL = 2.0
DRAIN_TIMEOUT = 0.5
CLOSE_SPREAD = 0.2
BACKEND_IDS = ("x1", "x2", "x3")

BACKEND_CODE = """\
import logging
logging.basicConfig(level=logging.INFO)
from lbproxy.backend.server import BackendOptions, run_backend
from lbproxy.config.types import Address
run_backend(BackendOptions(
    Address("127.0.0.1", {port}), id={id!r}, redis_url={url!r}, prefix={prefix!r}, pool="chat",
    rate=1e6, burst=1_000_000, presence_ttl={ttl!r}, ttl=2.0, drain_seconds=0.5,
))
"""

LBPROXY_CONFIG = """\
[admin]
listen = "127.0.0.1:{admin}"
[redis]
url = "{url}"
prefix = "{prefix}"
[listeners.public]
bind = "127.0.0.1:{port}"
pool = "chat"
[pools.chat]
balance = "hash"
hash_key = "query:user"
hash_balance_factor = 0
discovery = "redis"
allowed_networks = ["127.0.0.0/8"]
connect_timeout = 1.0
retries = 2
drain_timeout = {drain}
close_spread = {spread}
[pools.chat.health]
check = "http"
path = "/healthz"
interval = 0.3
timeout = 0.5
rise = 2
fall = 2
"""


@dataclass
class Cluster:
    port: int
    admin: int
    lb: Lbproxy
    backends: dict[str, Proc] = field(default_factory=dict)

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    def states(self) -> dict[str, str]:
        body = httpx.get(f"http://127.0.0.1:{self.admin}/api/pools", timeout=2).json()
        return {b["id"]: b["state"] for b in body["pools"]["chat"]["backends"]}

    def owner(self, user: str) -> str:
        """The backend lbproxy routes ``user`` to now (a plain request with the same key)."""
        url = f"http://127.0.0.1:{self.port}/whoami?user={user}"
        return str(httpx.get(url, timeout=5).json()["id"])

    def users_on_distinct_backends(self, count: int) -> list[tuple[str, str]]:
        """``count`` (user, backend) pairs, each user routed to a different backend."""
        found: dict[str, str] = {}
        for i in range(300):
            found.setdefault(self.owner(f"user{i}"), f"user{i}")
            if len(found) == count:
                return [(user, backend) for backend, user in found.items()]
        raise AssertionError(f"users reach only {sorted(found)}")

    def kill(self, backend_id: str) -> float:
        """SIGKILL a backend process; the monotonic time of the kill."""
        proc = self.backends[backend_id]
        killed = time.monotonic()
        proc.signal(signal.SIGKILL)
        proc.wait()
        return killed


def started_or_dead(port: int, proc: Proc) -> bool:
    return healthz(port) == 200 or not proc.alive()


def start_backends(redis_url: str) -> dict[str, Proc]:
    ports = {backend_id: free_port() for backend_id in BACKEND_IDS}
    procs = {
        backend_id: Proc(
            [
                sys.executable,
                "-c",
                BACKEND_CODE.format(
                    port=port, id=backend_id, url=redis_url, prefix=PREFIX, ttl=PRESENCE_TTL
                ),
            ]
        )
        for backend_id, port in ports.items()
    }
    try:
        for backend_id, port in ports.items():
            proc = procs[backend_id]
            wait_until(functools.partial(started_or_dead, port, proc), timeout=20)
            assert proc.alive(), proc.output()
    except BaseException:
        for proc in procs.values():
            proc.stop()
        raise
    return procs


@pytest.fixture
def cluster(redis: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    port, admin = free_port(), free_port()
    text = LBPROXY_CONFIG.format(
        admin=admin,
        url=redis.url,
        prefix=PREFIX,
        port=port,
        drain=DRAIN_TIMEOUT,
        spread=CLOSE_SPREAD,
    )
    backends = start_backends(redis.url)
    lb = Lbproxy(text, tmp_path, "--log-level", "info")
    the_cluster = Cluster(port, admin, lb, backends)
    try:
        lb.start(wait_ports=(port, admin))
        wait_until(lambda: the_cluster.states() == {b: "up" for b in BACKEND_IDS}, timeout=15)
        yield the_cluster
    finally:
        for proc in backends.values():
            proc.signal(signal.SIGTERM)
        if lb.proc is not None:
            print("---- lbproxy output ----\n" + lb.proc.output()[-4000:])
        lb.stop()
        for proc in backends.values():
            proc.stop()


@pytest.fixture
async def clients() -> AsyncIterator[list[ChatClient]]:
    """ChatClients a test registers here are closed at its end."""
    opened: list[ChatClient] = []
    yield opened
    for client in opened:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 3)


async def open_joined(
    cluster: Cluster, user: str, room: str, since: int | None, opened: list[ChatClient]
) -> tuple[ChatClient, dict[str, Any]]:
    client = await ChatClient.open(cluster.address, user)
    opened.append(client)
    return client, await client.join(room, since)


async def reconnect(
    cluster: Cluster, user: str, room: str, since: int, opened: list[ChatClient]
) -> tuple[ChatClient, dict[str, Any]]:
    """Connect and join through lbproxy, retrying with a short backoff (15 s at most)."""
    deadline = time.monotonic() + 15
    delay = 0.05
    while True:
        try:
            return await open_joined(cluster, user, room, since, opened)
        except (OSError, TimeoutError, WebSocketException, AssertionError) as exc:
            assert time.monotonic() < deadline, f"could not reconnect {user}: {exc!r}"
        await asyncio.sleep(delay)
        delay = min(0.5, delay * 2)


async def collect(client: ChatClient, into: list[dict[str, Any]]) -> ConnectionClosed:
    """Append every msg event to ``into`` until the connection closes; that close."""
    while True:
        try:
            event = await client.recv(timeout=60)
        except ConnectionClosed as closed:
            return closed
        assert event["op"] == "msg", event
        into.append(event)


def assert_in_order_once(ids: list[int]) -> None:
    assert ids == sorted(set(ids)), "ids must strictly increase: in order, no duplicates"


async def test_two_users_on_different_backends_exchange_1000_messages(
    cluster: Cluster, clients: list[ChatClient]
) -> None:
    (alice_name, alice_backend), (bob_name, bob_backend) = cluster.users_on_distinct_backends(2)
    alice, joined_a = await open_joined(cluster, alice_name, "big", None, clients)
    bob, joined_b = await open_joined(cluster, bob_name, "big", None, clients)
    assert joined_a["backend"] == alice_backend != joined_b["backend"] == bob_backend

    async def talk(client: ChatClient, name: str) -> None:
        for i in range(500):
            await client.say("big", f"{name}-{i}", f"{name}-{i}")
            await asyncio.sleep(0)  # let the other sender in: interleaved sends

    started = time.monotonic()
    got_alice, got_bob, _, _ = await asyncio.gather(
        alice.messages(1000, timeout=50),
        bob.messages(1000, timeout=50),
        talk(alice, alice_name),
        talk(bob, bob_name),
    )
    print(f"1000 messages through lbproxy and 2 backends in {time.monotonic() - started:.2f}s")
    for got in (got_alice, got_bob):
        assert_in_order_once([m["id"] for m in got])
        for name in (alice_name, bob_name):
            texts = [m["text"] for m in got if m["from"] == name]
            assert texts == [f"{name}-{i}" for i in range(500)]
    assert got_alice == got_bob
    await alice.nothing_for(0.3)
    await bob.nothing_for(0.05)


@dataclass
class Flow:
    """Sender B keeps sending numbered messages to a room; its acks are the stored ids."""

    sender: ChatClient
    user: str
    room: str
    acks: list[int] = field(default_factory=list)
    sent: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def send_until_stopped(self) -> None:
        while not self.stop.is_set():
            await self.sender.say(self.room, f"n{self.sent}", f"n{self.sent}")
            self.sent += 1
            await asyncio.sleep(0.005)

    async def read_acks(self) -> None:
        while True:
            event = await self.sender.recv(timeout=30)
            assert event["op"] == "msg" and event["from"] == self.user, event
            assert event["text"] == f"n{len(self.acks)}", event
            self.acks.append(event["id"])

    async def finish(self, reader: asyncio.Task[None]) -> None:
        self.stop.set()
        await asyncio.sleep(0.01)
        await await_flag(lambda: len(self.acks) == self.sent or reader.done(), 15)
        if reader.done():
            reader.result()  # raises what the reader failed on
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def await_flag(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def resume_after(
    cluster: Cluster,
    clients: list[ChatClient],
    room: str,
    disrupt: Callable[[str], Awaitable[float]],
) -> tuple[ConnectionClosed, float, float]:
    """A (on X) reads while B (on Y) sends; ``disrupt(X)`` cuts A off; A resumes with since.

    Returns A's close, the reconnect time (disruption -> joined again) and the time from the
    disruption to A's connection closing. Asserts A ends with B's stored ids, once, in order.
    """
    (a_name, x), (b_name, y) = cluster.users_on_distinct_backends(2)
    a, joined_a = await open_joined(cluster, a_name, room, 0, clients)
    b, joined_b = await open_joined(cluster, b_name, room, 0, clients)
    assert (joined_a["backend"], joined_b["backend"]) == (x, y)
    flow = Flow(b, b_name, room)
    got: list[dict[str, Any]] = []
    acks = asyncio.create_task(flow.read_acks())
    sending = asyncio.create_task(flow.send_until_stopped())
    first = asyncio.create_task(collect(a, got))
    try:
        await await_flag(lambda: len(got) >= 50, 15)
        disrupted = await disrupt(x)
        closed = await asyncio.wait_for(first, 10)
        dropped = time.monotonic() - disrupted
        a, joined = await reconnect(cluster, a_name, room, got[-1]["id"], clients)
        reconnect_time = time.monotonic() - disrupted
        assert joined["backend"] not in (x, ""), joined
        second = asyncio.create_task(collect(a, got))
        resumed_at = len(flow.acks)
        await await_flag(lambda: len(flow.acks) >= resumed_at + 50, 15)
        await flow.finish(acks)
        await await_flag(lambda: bool(got) and got[-1]["id"] >= flow.acks[-1], 15)
        await asyncio.sleep(0.3)  # anything extra (a duplicate) would arrive by now
        second.cancel()
    finally:
        for task in (sending, acks, first):
            task.cancel()
    assert_in_order_once(flow.acks)
    assert [m["id"] for m in got] == flow.acks, "A must have every stored message exactly once"
    assert all(m["from"] == b_name for m in got)
    print(f"{len(flow.acks)} messages; A reconnected {reconnect_time:.3f}s after the disruption")
    return closed, reconnect_time, dropped


async def test_sigkill_of_a_backend_while_messages_flow_resumes_without_gap(
    cluster: Cluster, clients: list[ChatClient]
) -> None:
    async def sigkill(backend_id: str) -> float:
        return cluster.kill(backend_id)

    closed, reconnect_time, dropped = await resume_after(cluster, clients, "kill", sigkill)
    print(f"SIGKILL: connection dropped after {dropped:.3f}s, reconnected after "
          f"{reconnect_time:.3f}s")  # fmt: skip
    assert closed.rcvd is None or closed.rcvd.code != 1000, closed
    assert reconnect_time < 10
    killed = next(b for b, p in cluster.backends.items() if not p.alive())
    wait_until(lambda: cluster.states().get(killed, "gone") != "up", timeout=5)


async def test_drained_backend_closes_with_1001_and_the_client_resumes(
    cluster: Cluster, clients: list[ChatClient]
) -> None:
    async def drain(backend_id: str) -> float:
        url = f"http://127.0.0.1:{cluster.admin}/api/pools/chat/backends/{backend_id}/drain"
        started = time.monotonic()
        async with httpx.AsyncClient() as http:
            assert (await http.post(url, timeout=5)).status_code == 202
        assert cluster.states()[backend_id] == "draining"
        return started

    closed, reconnect_time, dropped = await resume_after(cluster, clients, "drain", drain)
    print(f"drain: 1001 after {dropped:.3f}s, reconnected after {reconnect_time:.3f}s")
    assert closed.rcvd is not None and closed.rcvd.code == 1001, closed
    assert DRAIN_TIMEOUT - 0.05 <= dropped < DRAIN_TIMEOUT + CLOSE_SPREAD + 2.0


async def presence(client: ChatClient, room: str) -> list[str]:
    await client.send(op="presence", room=room)
    event = await client.recv()
    assert event["op"] == "presence", event
    users: list[str] = event["users"]
    return users


async def test_presence_across_backends_and_expiry_after_sigkill(
    cluster: Cluster, clients: list[ChatClient]
) -> None:
    (a_name, _), (b_name, b_backend) = cluster.users_on_distinct_backends(2)
    a, _ = await open_joined(cluster, a_name, "here", None, clients)
    b, _ = await open_joined(cluster, b_name, "here", None, clients)
    both = sorted([a_name, b_name])
    deadline = time.monotonic() + 5
    while await presence(a, "here") != both or await presence(b, "here") != both:
        assert time.monotonic() < deadline, "A and B must see each other across backends"
        await asyncio.sleep(0.05)

    killed = cluster.kill(b_backend)
    while (users := await presence(a, "here")) != [a_name]:
        assert users == both, users
        assert time.monotonic() - killed < PRESENCE_TTL + 2.0, "B must leave within the TTL"
        await asyncio.sleep(0.1)
    gone = time.monotonic() - killed
    print(f"B left presence {gone:.2f}s after its backend was killed (ttl {PRESENCE_TTL}s)")
    await asyncio.sleep(0.3)
    assert await presence(a, "here") == [a_name]


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]

SUBMIT_JS = """(texts) => {
  for (const t of texts) {
    document.getElementById("text").value = t;
    document.getElementById("form").requestSubmit();
  }
}"""
STATE_JS = "() => document.getElementById('status').dataset.state"


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def open_page(browser: Any, cluster: Cluster, user: str, backend: str) -> Any:
    from playwright.async_api import expect

    context = await browser.new_context()  # own cookies: each page its own chat session
    page = await context.new_page()
    await page.goto(f"http://127.0.0.1:{cluster.port}/?room=web&user={user}")
    await expect(page.locator("#status")).to_have_text("connected", timeout=15_000)
    await expect(page.locator("#backend")).to_have_text(backend)
    return page


async def say(page: Any, text: str) -> None:
    from playwright.async_api import expect

    await page.fill("#text", text)
    await page.click("#send")
    await expect(page.locator("#messages li.pending")).to_have_count(0, timeout=10_000)


async def texts_and_ids(page: Any) -> tuple[list[str], list[int]]:
    texts: list[str] = await page.locator("#messages li .text").all_text_contents()
    ids: list[str] = await page.locator("#messages li").evaluate_all(
        "(items) => items.map((li) => li.dataset.id)"
    )
    return texts, [int(i) for i in ids]


async def test_browser_pages_through_lbproxy_resume_after_sigkill(
    cluster: Cluster, browser: Any
) -> None:
    from playwright.async_api import expect

    (u1, b1), (u2, b2) = cluster.users_on_distinct_backends(2)
    page1 = await open_page(browser, cluster, u1, b1)
    page2 = await open_page(browser, cluster, u2, b2)
    await say(page1, "hello from page 1")
    await expect(page2.locator("#messages li .text")).to_have_text(["hello from page 1"])
    await say(page2, "hi from page 2")
    await expect(page1.locator("#messages li .text")).to_have_text(
        ["hello from page 1", "hi from page 2"]
    )

    killed = cluster.kill(b1)
    await page1.wait_for_function(f"() => ({STATE_JS})() !== 'open'", timeout=10_000)
    outage = [f"during outage {i}" for i in range(3)]
    await page2.evaluate(SUBMIT_JS, outage)
    sent_while_down = await page1.evaluate(STATE_JS) != "open"
    await expect(page2.locator("#messages li.pending")).to_have_count(0, timeout=10_000)
    await expect(page1.locator("#status")).to_have_text("connected", timeout=20_000)
    print(f"page 1 reconnected {time.monotonic() - killed:.2f}s after SIGKILL "
          f"(outage messages sent while it was down: {sent_while_down})")  # fmt: skip
    await expect(page1.locator("#backend")).not_to_have_text(b1)
    expected = ["hello from page 1", "hi from page 2", *outage]
    await expect(page1.locator("#messages li .text")).to_have_text(expected, timeout=10_000)
    await say(page1, "back again")
    await expect(page2.locator("#messages li .text")).to_have_text([*expected, "back again"])
    for page in (page1, page2):
        texts, ids = await texts_and_ids(page)
        assert texts == [*expected, "back again"]
        assert_in_order_once(ids)
    assert sent_while_down, "the outage messages must be sent while page 1 is disconnected"
