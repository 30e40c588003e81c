"""Reading one TOML table with typed getters that record every problem and fall back to
the default (no I/O): the building blocks of load.py's validation."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection, Mapping
from typing import Any, TypeVar, cast

from lbproxy.addresses import parse_address
from lbproxy.config.types import Address, IPNetwork

_S = TypeVar("_S", bound=str)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class Problems:
    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[str] = []
        self.keys_seen: set[str] = set()

    def add(self, key: str, message: str) -> None:
        self.keys_seen.add(key)
        self.lines.append(f"{self.path}: {key}: {message}")


def join(*parts: str) -> str:
    return ".".join(p if _BARE_KEY.fullmatch(p) else f'"{p}"' for p in parts)


def show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Section:
    """One TOML table: typed getters that record problems and fall back to the given default."""

    def __init__(
        self, data: Mapping[str, Any], where: str, problems: Problems, known: Collection[str]
    ) -> None:
        self.data, self.where, self.problems = data, where, problems
        for key in data:
            if key not in known:
                self.bad(key, "unknown key")

    def key(self, name: str) -> str:
        return f"{self.where}.{join(name)}" if self.where else join(name)

    def bad(self, name: str, message: str) -> None:
        self.problems.add(self.key(name), message)

    def table(self, name: str) -> Mapping[str, Any] | None:
        value = self.data.get(name)
        if value is None or isinstance(value, Mapping):
            return value
        self.bad(name, f"must be a table, got {show(value)}")
        return None

    def number(self, name: str, default: float, *, zero_ok: bool) -> float:
        value = self.data.get(name, default)
        if is_number(value) and (value >= 0 if zero_ok else value > 0):
            return float(value)
        sign = "non-negative" if zero_ok else "positive"
        self.bad(name, f"must be a {sign} number, got {show(value)}")
        return default

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.data.get(name, default)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        if ok and (high is None or value <= high):
            return cast(int, value)
        wanted = f"from {low} to {high}" if high is not None else f">= {low}"
        self.bad(name, f"must be an integer {wanted}, got {show(value)}")
        return default

    def string(self, name: str, default: str, *, required: bool = False) -> str:
        if required and name not in self.data:
            self.bad(name, "required")
            return default
        value = self.data.get(name, default)
        if isinstance(value, str):
            return value
        self.bad(name, f"must be a string, got {show(value)}")
        return default

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if isinstance(value, bool):
            return value
        self.bad(name, f"must be true or false, got {show(value)}")
        return default

    def choice(self, name: str, default: _S, allowed: tuple[_S, ...]) -> _S:
        value = self.data.get(name, default)
        if isinstance(value, str) and value in allowed:
            return value
        listed = ", ".join(repr(a) for a in allowed)
        self.bad(name, f"must be one of {listed}, got {show(value)}")
        return default

    def address(self, name: str, default: Address, *, required: bool = False) -> Address:
        if name not in self.data:
            if required:
                self.bad(name, "required")
            return default
        value = self.data[name]
        if not isinstance(value, str):
            self.bad(name, f'must be a string "HOST:PORT", got {show(value)}')
            return default
        try:
            return parse_address(value)
        except ValueError as exc:
            self.bad(name, str(exc))
            return default

    def networks(self, name: str) -> tuple[IPNetwork, ...]:
        value = self.data.get(name, [])
        if not isinstance(value, list):
            self.bad(name, f"must be a list of CIDR strings, got {show(value)}")
            return ()
        result: list[IPNetwork] = []
        for index, item in enumerate(value):
            try:
                if not isinstance(item, str):
                    raise ValueError
                result.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.problems.add(f"{self.key(name)}[{index}]", f"not a CIDR network: {show(item)}")
        return tuple(result)
