"""Kept for the tunnel tests that import it: the config builder lives in tests/support/config.py."""

from __future__ import annotations

from tests.support.config import proxy_config, toml_value

__all__ = ["proxy_config", "toml_value"]
