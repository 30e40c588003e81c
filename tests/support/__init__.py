"""Test helpers: free ports, polling with a deadline, real redis-server and lbproxy processes.

- ``ports``: ``free_port`` (one slice per pytest-xdist worker), ``port_open``, ``wait_until``
  / ``await_until`` (poll with a deadline, never a fixed sleep), ``REPO``.
- ``processes``: ``Proc`` (a subprocess stopped by PID), ``RedisServer``, ``Backend`` (the
  reference backend), ``Lbproxy`` (the one way to start ``lbproxy serve``), ``engine_env``.
- ``config``: ``proxy_config``, one listener in front of one pool, as TOML text.
- ``backend`` (in-process reference backend, raw HTTP and chat clients), ``registry``
  (pools, watchers and raw registry writes), ``deploy`` (Prometheus, promtool, the deploy
  files) and ``sio_node`` (a python-socketio node, ``python -m tests.support.sio_node``):
  import them from their submodule.

The tunnel engine fixture (``engine``: "native", "python") is in tests/conftest.py.
"""

from __future__ import annotations

from tests.support.config import proxy_config, toml_value
from tests.support.ports import REPO, await_until, free_port, port_open, wait_until
from tests.support.processes import (
    ENGINES,
    Backend,
    Lbproxy,
    Proc,
    RedisServer,
    engine_env,
    lbproxy_cmd,
    redis_server,
    rss_kib,
)

__all__ = [
    "ENGINES",
    "REPO",
    "Backend",
    "Lbproxy",
    "Proc",
    "RedisServer",
    "await_until",
    "engine_env",
    "free_port",
    "lbproxy_cmd",
    "port_open",
    "proxy_config",
    "redis_server",
    "rss_kib",
    "toml_value",
    "wait_until",
]
