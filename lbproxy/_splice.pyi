from collections.abc import Callable
from typing import Any

class Engine:
    def __init__(
        self,
        on_finish: Callable[[Any, str, int, int, int, int, int, int], None],
        on_data: Callable[[Any, bytes | None, int], None] | None = ...,
        bufsize: int = ...,
        *,
        rules: bytes,
        close_frame: bytes,
    ) -> None: ...
    def fileno(self) -> int: ...
    def add(
        self,
        owner: object,
        client_fd: int,
        backend_fd: int,
        ws: bool,
        partial: bytes,
        skip: int,
        saw_close: bool,
        /,
    ) -> int: ...
    def pump(self) -> None: ...
    def counts(self, slot: int, owner: object, /) -> tuple[int, int]: ...
    def go_away(self, slot: int, owner: object, /) -> None: ...
    def close(self, slot: int, owner: object, /) -> tuple[int, int]: ...
    def connect(self, owner: object, host: str, port: int, request: bytes, /) -> int: ...
    def splice(
        self,
        slot: int,
        owner: object,
        new_owner: object,
        client_fd: int,
        to_client: bytes,
        to_backend: bytes,
        ws: bool,
        partial: bytes,
        skip: int,
        saw_close: bool,
        /,
    ) -> None: ...
    def release(self, slot: int, owner: object, /) -> int: ...
    def resume(self, slot: int, owner: object, /) -> None: ...
    def connected(self, slot: int, owner: object, /) -> bool: ...
    def export(self, slot: int, owner: object, /) -> tuple[int, int, dict[str, Any]]: ...
    def import_tunnel(
        self, owner: object, client_fd: int, backend_fd: int, state: dict[str, Any], /
    ) -> int: ...
    def ws_policy(
        self,
        params: tuple[int, int, int, int, int],
        opcodes: bytes,
        frames: tuple[bytes, ...],
        ping: bytes,
        /,
    ) -> None: ...
    def sweep(self, now_ns: int, /) -> list[tuple[Any, int]]: ...
    def messages(self, slot: int, owner: object, /) -> tuple[int, int, int, int]: ...
    def __len__(self) -> int: ...
