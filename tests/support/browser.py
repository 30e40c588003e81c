"""Headless Chromium for the page tests (Debian's chromium, driven by playwright)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


@contextlib.asynccontextmanager
async def chromium_page(**options: Any) -> AsyncIterator[Any]:
    """A fresh page in a fresh headless Chromium, closed afterwards (``options`` go to
    ``new_page``, e.g. a viewport)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield await browser.new_page(**options)
        finally:
            await browser.close()
