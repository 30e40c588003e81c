"""The chat page in headless Chromium: send, receive, presence, reconnect and resume."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from lbproxy.backend.server import BackendOptions
from lbproxy.config.types import Address
from tests.support import RedisServer, free_port
from tests.support.backend import ChatClient, backend_process, running_backend
from tests.support.browser import CHROMIUM

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"
)


async def test_page_chats_across_backends_and_resumes_after_its_backend_dies(
    redis: RedisServer, page: Any
) -> None:
    from playwright.async_api import expect

    port = free_port()
    extra = {"redis_url": redis.url, "prefix": "t", "id": "A"}
    proc, address = backend_process(port, **extra)
    options = BackendOptions(Address("127.0.0.1", 0), redis_url=redis.url, prefix="t", id="B")
    bob: ChatClient | None = None
    try:
        async with running_backend(options) as b:
            await page.goto(f"http://{address}/?room=lobby&user=alice")
            await expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
            await expect(page.locator("#backend")).to_have_text("A")
            bob = await ChatClient.open(b, "bob")
            await bob.join("lobby")

            await page.fill("#text", "hello from the page")
            await page.click("#send")
            (got,) = await bob.messages(1)
            assert (got["from"], got["text"]) == ("alice", "hello from the page")
            await bob.say("lobby", "hi alice")
            await bob.messages(1)  # bob is a member: his own message comes back to him
            messages = page.locator("#messages li")
            await expect(messages).to_have_count(2)
            await expect(messages.nth(1)).to_contain_text("hi alice")
            await expect(page.locator("#messages li.pending")).to_have_count(0)
            await expect(page.locator("#users li")).to_have_text(["alice", "bob"], timeout=8000)

            proc.signal(signal.SIGKILL)
            proc.wait()
            await expect(page.locator("#status")).to_have_attribute("data-state", "closed")
            await page.fill("#text", "typed while down")
            await page.click("#send")
            await expect(page.locator("#messages li.pending")).to_have_count(1)
            await bob.say("lobby", "while you were away")
            await bob.messages(1)
            proc.stop()

            proc, _ = backend_process(port, **extra)  # the same address comes back
            await expect(page.locator("#status")).to_have_text("connected", timeout=30_000)
            await expect(page.locator("#messages li.pending")).to_have_count(0, timeout=10_000)
            texts = await page.locator("#messages li .text").all_text_contents()
            assert texts.count("while you were away") == 1  # replayed with since
            assert texts.count("typed while down") == 1
            (resent,) = await bob.messages(1)  # the unacknowledged send, delivered once
            assert resent["text"] == "typed while down"
            await bob.nothing_for(0.5)
    finally:
        if bob is not None:
            await bob.close()
        proc.stop()
