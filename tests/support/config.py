"""Build lbproxy TOML configs for integration tests."""

from __future__ import annotations

from collections.abc import Sequence

from tests.support.ports import free_port


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def proxy_config(
    backends: Sequence[tuple[str, str]],
    *,
    port: int | None = None,
    admin_port: int | None = None,
    mode: str = "http",
    listener: dict[str, object] | None = None,
    pool: dict[str, object] | None = None,
    health: dict[str, object] | None = None,
    extra: str = "",
) -> tuple[str, int, int]:
    """(config text, listener port, admin port) for one listener in front of one pool."""
    port = port or free_port()
    admin_port = admin_port or free_port()
    while admin_port == port:  # a port just closed can be handed out again
        admin_port = free_port()
    lines = [
        "[admin]",
        f'listen = "127.0.0.1:{admin_port}"',
        "",
        "[listeners.public]",
        f'bind = "127.0.0.1:{port}"',
        f'mode = "{mode}"',
        'pool = "main"',
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in (listener or {}).items()]
    lines += ["", "[pools.main]"]
    pool_opts: dict[str, object] = {"balance": "least-connections"}
    pool_opts.update(pool or {})
    lines += [f"{k} = {toml_value(v)}" for k, v in pool_opts.items()]
    lines.append("backends = [")
    lines += [f'  {{ id = "{bid}", address = "{addr}" }},' for bid, addr in backends]
    lines.append("]")
    lines += ["", "[pools.main.health]"]
    health_opts: dict[str, object] = {"check": "none"}
    health_opts.update(health or {})
    lines += [f"{k} = {toml_value(v)}" for k, v in health_opts.items()]
    return "\n".join(lines) + "\n" + extra, port, admin_port
