from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.support import ENGINES, RedisServer
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
