from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RedisServer


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A fresh real redis-server on a free port for one test."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
