"""The one exception hierarchy of lbproxy."""

from __future__ import annotations


class LbproxyError(Exception):
    """Base of every error lbproxy raises on purpose."""


class ConfigError(LbproxyError):
    """A configuration that failed validation; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class HttpError(LbproxyError):
    """A protocol error that should be answered with HTTP ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


class RegistryError(LbproxyError):
    """Redis registry unreachable or holding something unusable."""
