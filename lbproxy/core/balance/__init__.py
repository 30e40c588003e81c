"""Pure backend selection: no sockets, no asyncio, no clocks.

Round-robin, weighted least connections, consistent hashing (a weighted ring) with
bounded loads, sticky sessions, and extraction of affinity keys from requests.
"""

from __future__ import annotations

from lbproxy.core.balance.bounded import bounded_choice
from lbproxy.core.balance.consistent_hash import ConsistentHash
from lbproxy.core.balance.hashing import key_hash
from lbproxy.core.balance.keys import (
    HashKeySpec,
    extract_key,
    get_cookie,
    new_sticky_value,
    parse_hash_key,
)
from lbproxy.core.balance.least_connections import least_connections
from lbproxy.core.balance.round_robin import SmoothRoundRobin
from lbproxy.core.balance.sticky import AffinityTable, CookieSigner, Stick, cookie_secret

__all__ = [
    "AffinityTable",
    "ConsistentHash",
    "CookieSigner",
    "HashKeySpec",
    "SmoothRoundRobin",
    "Stick",
    "bounded_choice",
    "cookie_secret",
    "extract_key",
    "get_cookie",
    "key_hash",
    "least_connections",
    "new_sticky_value",
    "parse_hash_key",
]
