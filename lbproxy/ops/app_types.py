"""What App is told about its role and, as a supervisor, about its workers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

from lbproxy.ops.stats import Stats

Role = Literal["single", "supervisor", "worker"]


class BalancerView(Protocol):
    """What the supervisor knows of its workers (the admin API and /metrics read it)."""

    def stats(self) -> Stats: ...
    def listeners(self) -> Mapping[str, int]: ...
    def native(self) -> Mapping[str, int]: ...
    def workers(self) -> list[dict[str, int]]: ...
