"""The live dashboard in headless Chromium, against a real AdminServer."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from lbproxy.config.types import Address, AdminConfig, BackendConfig, PoolConfig
from lbproxy.core.pool import BackendState, Pool
from lbproxy.ops.admin import AdminServer
from lbproxy.ops.metrics import build_registry
from lbproxy.ops.stats import Stats
from tests.support import await_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = "/tmp/dashboard.png"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"
)


@dataclass
class Dashboard:
    url: str
    pools: dict[str, Pool]
    stats: Stats


async def start(token: str = "") -> tuple[AdminServer, Dashboard]:
    chat = Pool(
        PoolConfig(
            name="chat",
            backends=tuple(
                BackendConfig(f"b{i}", Address("127.0.0.1", 9000 + i), weight=i) for i in (1, 2, 3)
            ),
        )
    )
    echo = Pool(PoolConfig(name="echo", balance="hash", backends=()))
    echo.upsert("ws-1", Address("10.1.0.7", 8080), 1, source="redis")
    pools = {"chat": chat, "echo": echo}
    stats = Stats()
    registry = build_registry(lambda: pools, stats, lambda: {"public": 3})
    server = AdminServer(AdminConfig(Address("127.0.0.1", 0), token), lambda: pools, registry)
    address = await server.start()
    return server, Dashboard(f"http://{address}/", pools, stats)


@pytest.fixture
async def browser_page() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 640})
            yield page
        finally:
            await browser.close()


async def make_traffic(stats: Stats) -> None:
    """About 10 MB/s out of chat/b1 and 50 connections/s, until cancelled."""
    while True:
        stats.bytes[("chat", "b1", "out")] += 1_000_000
        stats.connections_total["public"] += 5
        await asyncio.sleep(0.1)


async def test_dashboard_lists_drains_and_updates_live(browser_page: object) -> None:
    from playwright.async_api import Page, expect

    page = browser_page
    assert isinstance(page, Page)
    server, dash = await start()
    try:
        chat = dash.pools["chat"]
        chat.backends["b1"].active = 17
        await page.goto(dash.url)
        row = page.locator('tr.backend[data-pool="chat"][data-id="b1"]')
        await expect(row.locator(".state")).to_have_text("up")
        await expect(row.locator(".active")).to_have_text("17")
        await expect(page.locator("#pools tr.backend")).to_have_count(4)
        await expect(page.locator('tr.backend[data-id="ws-1"] .state')).to_have_text("up")
        await expect(page.locator('section.pool[data-pool="echo"] h2')).to_contain_text("hash")

        # counters move: the page shows rates computed from deltas between polls
        traffic = asyncio.create_task(make_traffic(dash.stats))
        try:
            await expect(row.locator(".out-rate")).to_have_text(re.compile(r"^[0-9.]+ MB$"))
            await expect(page.locator("#conn-rate")).to_have_text(re.compile(r"^[1-9][0-9.]*$"))
            await expect(row.locator(".in-rate")).to_have_text("0 B")
            await expect(page.locator("#open-connections")).to_have_text("3")

            # clicking drain changes the pool and the state shown
            await row.locator("button.drain").click()
            await expect(row.locator(".state")).to_have_text("draining")
            await expect(row.locator(".state")).to_have_class("state draining")
            assert chat.backends["b1"].state is BackendState.DRAINING

            # a state change made elsewhere (health check) shows up on the next poll
            chat.mark_down("b2", "health check failed")
            b2 = page.locator('tr.backend[data-id="b2"] .state')
            await expect(b2).to_have_text("down", timeout=5000)
            # membership changes too
            chat.upsert("b4", Address("127.0.0.1", 9004), 1, source="redis")
            await expect(page.locator('tr.backend[data-id="b4"] .state')).to_have_text("up")
            await page.screenshot(path=SCREENSHOT, full_page=True)
        finally:
            traffic.cancel()

        await page.locator('tr.backend[data-id="b2"] button.enable').click()
        await expect(b2).to_have_text("up")
        assert chat.backends["b2"].state is BackendState.UP
    finally:
        await server.stop()


async def test_dashboard_prompts_for_the_token(browser_page: object) -> None:
    from playwright.async_api import Dialog, Page, expect

    page = browser_page
    assert isinstance(page, Page)
    server, dash = await start(token="t0ken")
    prompts: list[str] = []

    async def answer(dialog: Dialog) -> None:
        prompts.append(dialog.message)
        await dialog.accept("t0ken")

    page.on("dialog", answer)
    try:
        await page.goto(dash.url)
        row = page.locator('tr.backend[data-id="b3"]')
        await expect(row.locator(".state")).to_have_text("up")
        await row.locator("button.drain").click()
        await expect(row.locator(".state")).to_have_text("draining")
        assert dash.pools["chat"].backends["b3"].state is BackendState.DRAINING
        assert len(prompts) == 1 and "token" in prompts[0].lower()
        # the token is remembered: no second prompt
        await row.locator("button.enable").click()
        await expect(row.locator(".state")).to_have_text("up")
        await await_until(lambda: dash.pools["chat"].backends["b3"].state is BackendState.UP)
        assert len(prompts) == 1
    finally:
        await server.stop()
