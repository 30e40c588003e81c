"""The reference chat/echo backend (README "The reference chat backend"): ``lbproxy backend``.

Entry points live in :mod:`lbproxy.backend.server` (``BackendOptions``, ``serve_backend``,
``run_backend``); importing this package has no side effects and pulls in nothing else.
"""

from __future__ import annotations
