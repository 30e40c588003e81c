"""Side-by-side benchmark of lbproxy against a direct connection, NGINX and HAProxy.

Run it with ``python -m bench [--quick] [--out DIR]`` (see ``bench/cli.py`` and bench/README.md).
"""

from __future__ import annotations
