"""The dashboard of `serve --workers 2` lists the balancer's workers (headless Chromium)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_dashboard import CHROMIUM, browser_page
from tests.support import Backend, Lbproxy, wait_until
from tests.support.config import proxy_config

__all__ = ["browser_page"]  # the fixture, shared with test_dashboard

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
    pytest.mark.timeout(60),
]


async def test_dashboard_lists_the_workers(browser_page: object, tmp_path: Path) -> None:
    backend = Backend("d1").start()
    try:
        text, port, admin = proxy_config([(backend.id, backend.address)])
        lb = Lbproxy(text, tmp_path, "--workers", "2").start(wait_ports=(port,))
        try:
            info_url = f"http://127.0.0.1:{admin}/api/info"
            wait_until(lambda: len(httpx.get(info_url).json()["workers"]) == 2, timeout=20)
            pids = [w["pid"] for w in httpx.get(info_url).json()["workers"]]
            page = browser_page
            await page.goto(f"http://127.0.0.1:{admin}/")  # type: ignore[attr-defined]

            async def listed() -> str:
                return str(await page.inner_text("#workers"))  # type: ignore[attr-defined]

            def shows_all(shown: str) -> bool:
                return f"pid {lb.pid}" in shown and all(f"pid {p}: 0 open" in shown for p in pids)

            shown = ""
            for _ in range(100):  # (one read per look: the page may render between two reads)
                shown = await listed()
                if shows_all(shown):
                    break
                await page.wait_for_timeout(100)  # type: ignore[attr-defined]
            assert shows_all(shown), shown
            assert "2 workers" in shown and "generation 1" in shown
        finally:
            lb.stop()
    finally:
        backend.stop()
