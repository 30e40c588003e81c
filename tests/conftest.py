from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.support import ENGINES, Backend, RedisServer
from tests.support.browser import chromium_page


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A fresh real redis-server on a free port for one test."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The tunnel engine a test runs on, "native" (the C engine) then "python"; pass it
    as ``Lbproxy(..., engine=engine)`` (support.engine_env gives the environment)."""
    return str(request.param)


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    """A page in a fresh headless Chromium (the page tests skip when it is not installed)."""
    async with chromium_page() as opened:
        yield opened


@pytest.fixture(scope="module")
def backends() -> Iterator[list[Backend]]:
    """Three reference backends b1..b3 shared by a module's tests (a module may define its
    own ``backends`` instead)."""
    started = [Backend(f"b{i}").start() for i in range(1, 4)]
    try:
        yield started
    finally:
        for b in started:
            b.stop()
