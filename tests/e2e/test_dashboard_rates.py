"""Live rates and per-backend history (README "Admin API, dashboard and metrics").

The pure History ring buffer in memory; then a real lbproxy and backend with a websocket
streaming through it, and the dashboard in headless Chromium showing the bytes move
while the websocket is still open (bytes used to reach the stats only at close or by
the idle sweep, every 15 s here).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from lbproxy.ops.stats import History
from tests.support import Backend, Lbproxy, proxy_config
from tests.support.browser import CHROMIUM, chromium_page

pytestmark = pytest.mark.timeout(60)


def test_history_keeps_rates_per_backend_bounded_and_incremental() -> None:
    history = History(size=3)
    key = ("chat", "b1")
    history.record(10.0, 1000.0, {key: (2, 0, 0, 0)})
    history.record(11.0, 1001.0, {key: (3, 500, 2000, 4), ("chat", "b2"): (1, 9, 9, 9)})
    history.record(13.0, 1003.0, {key: (1, 1500, 2000, 6)})
    doc = history.document()
    assert doc["seq"] == 3 and doc["size"] == 3
    samples = doc["samples"]
    assert isinstance(samples, list)
    assert [s["backends"]["chat"]["b1"] for s in samples] == [
        [2, 0.0, 0.0, 0.0],
        [3, 500.0, 2000.0, 4.0],
        [1, 500.0, 0.0, 1.0],  # over 2 s
    ]
    assert samples[1]["backends"]["chat"]["b2"] == [1, 0.0, 0.0, 0.0]  # new: no rate yet
    assert "b2" not in samples[2]["backends"]["chat"]  # gone
    history.record(14.0, 1004.0, {key: (0, 1000, 0, 0)})  # a counter going back: not negative
    later = history.document(since=3)["samples"]
    assert isinstance(later, list) and [s["seq"] for s in later] == [4]
    assert later[0]["backends"]["chat"]["b1"] == [0, 0.0, 0.0, 0.0]
    assert [s["seq"] for s in history.document()["samples"]] == [2, 3, 4]  # type: ignore[union-attr]


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[int, int]]:
    backend = Backend("b1").start()
    text, port, admin_port = proxy_config(
        [(backend.id, backend.address)], listener={"idle_timeout": 600.0}
    )
    proxy = Lbproxy(text, tmp_path).start(wait_ports=(port, admin_port))
    try:
        yield port, admin_port
    finally:
        proxy.stop()
        backend.stop()


@pytest.fixture
async def page() -> AsyncIterator[object]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    async with chromium_page(viewport={"width": 1400, "height": 500}) as opened:
        yield opened


async def stream(port: int, opened: asyncio.Event) -> None:
    """About 400 kB/s each way through lbproxy's native tunnel, until cancelled."""
    payload = os.urandom(8192)
    async with ws_connect(f"ws://127.0.0.1:{port}/echo", max_size=None) as ws:
        opened.set()
        while True:
            await ws.send(payload)
            assert await ws.recv() == payload
            await asyncio.sleep(0.02)


async def test_dashboard_rates_move_while_a_websocket_streams(
    proxied: tuple[int, int], page: object
) -> None:
    from playwright.async_api import Page, expect

    assert isinstance(page, Page)
    port, admin_port = proxied
    opened = asyncio.Event()
    traffic = asyncio.create_task(stream(port, opened))
    try:
        await asyncio.wait_for(opened.wait(), 10)
        await page.goto(f"http://127.0.0.1:{admin_port}/")
        row = page.locator('tr.backend[data-pool="main"][data-id="b1"]')
        await expect(row.locator(".active")).to_have_text("1")
        live = r"^[1-9][0-9.]* (kB|MB)$"
        await expect(row.locator(".in-rate")).to_have_text(re.compile(live), timeout=8000)
        await expect(row.locator(".out-rate")).to_have_text(re.compile(live), timeout=8000)
        await expect(page.locator("#bytes-out-rate")).to_have_text(re.compile(live), timeout=8000)
        # the server-side history has the picture too, and the page draws it
        cell = row.locator("td.history")
        await await_until_async(lambda: _positive(cell.get_attribute("data-last-bytes")))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}") as client:
            doc = (await client.get("/api/history")).json()
            assert (await client.get("/api/history?since=x")).status_code == 400
        points = [s["backends"]["main"]["b1"] for s in doc["samples"]]
        assert any(p[0] == 1 and p[1] > 10_000 and p[2] > 10_000 for p in points), points
        assert not traffic.done()  # all of it while the websocket is still open
    finally:
        traffic.cancel()
        await asyncio.gather(traffic, return_exceptions=True)
    # after a page reload the history is still there (kept by the server)
    await page.reload()
    await await_until_async(lambda: _positive(cell.get_attribute("data-peak-bytes")))
    await page.screenshot(path="/tmp/dashboard-rates.png")


async def _positive(value: Awaitable[str | None]) -> bool:
    text = await value
    return text is not None and float(text) > 0


async def await_until_async(cond: Callable[[], Awaitable[bool]], timeout: float = 8.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.1)
