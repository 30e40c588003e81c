"""The chat page in headless Chromium when things fail: dedupe by (from, client_msg_id), and
pings that find a backend that stopped answering (SIGSTOP) so the page reconnects elsewhere."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from lbproxy.backend.server import BackendOptions
from lbproxy.config.types import Address
from tests.support import Lbproxy, Proc, RedisServer, proxy_config
from tests.support.backend import ChatClient, backend_process, running_backend
from tests.support.browser import CHROMIUM

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
    pytest.mark.timeout(60),
]


async def test_page_shows_a_message_once_when_it_is_delivered_twice(
    redis: RedisServer, page: Any
) -> None:
    """Redis loses its data (FLUSHALL) and bob re-sends: the same (from, client_msg_id) is
    stored and delivered again under a new id; the page shows it once."""
    from playwright.async_api import expect

    options = BackendOptions(Address("127.0.0.1", 0), redis_url=redis.url, prefix="pg", id="A")
    async with running_backend(options) as a:
        await page.goto(f"http://{a}/?room=lobby&user=alice")
        await expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
        bob = await ChatClient.open(a, "bob")
        try:
            await bob.join("lobby")
            await bob.say("lobby", "once", "c1")
            (first,) = await bob.messages(1)
            await expect(page.locator("#messages li .text")).to_have_text(["once"])
            r = aioredis.Redis(port=redis.port)
            try:
                await r.flushall()  # the dedupe record of c1 is gone
            finally:
                await r.aclose()
            await bob.say("lobby", "once", "c1")
            (second,) = await bob.messages(1)
            assert second["id"] != first["id"] and "duplicate" not in second  # delivered again
            await bob.say("lobby", "after", "c2")
            await bob.messages(1)
            texts = page.locator("#messages li .text")
            await expect(texts).to_have_text(["once", "after"])
        finally:
            await bob.close()


async def test_page_pings_find_a_stopped_backend_and_reconnect_elsewhere(
    redis: RedisServer, page: Any, tmp_path: Path
) -> None:
    """Two backends behind lbproxy (no health checks: only the page can notice); the one the
    page is on is SIGSTOPped; 2 unanswered pings later the page is on the other one."""
    from playwright.async_api import expect

    procs: dict[str, Proc] = {}
    addresses: list[tuple[str, str]] = []
    lb: Lbproxy | None = None
    try:
        started = await asyncio.gather(  # both at once
            *(
                asyncio.to_thread(backend_process, redis_url=redis.url, prefix="pg", id=b)
                for b in ("A", "B")
            )
        )
        for backend_id, (proc, address) in zip(("A", "B"), started, strict=True):
            procs[backend_id] = proc
            addresses.append((backend_id, str(address)))
        text, port, admin = proxy_config(addresses, pool={"balance": "round-robin"})
        lb = Lbproxy(text, tmp_path).start(wait_ports=(port, admin))
        await page.goto(f"http://127.0.0.1:{port}/?room=r&user=carol&ping=300&handshake=1500")
        await expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
        first = await page.locator("#backend").text_content()
        assert first in procs, first
        other = next(b for b in procs if b != first)
        procs[first].signal(signal.SIGSTOP)
        await expect(page.locator("#backend")).to_have_text(other, timeout=15_000)
        await expect(page.locator("#status")).to_have_text("connected")
        await page.fill("#text", "after the stop")
        await page.click("#send")
        await expect(page.locator("#messages li.pending")).to_have_count(0, timeout=5_000)
        await page.goto("about:blank")  # no websocket left open: lbproxy stops at once
    finally:
        for proc in procs.values():
            proc.signal(signal.SIGCONT)
        if lb is not None:
            lb.stop()
        for proc in procs.values():
            proc.stop()
