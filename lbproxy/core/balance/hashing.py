"""Stable hashing shared by every lbproxy instance.

Python's ``hash()`` is salted per process, so affinity uses BLAKE2b instead: the same
bytes give the same 64-bit value in every process, on every machine and Python build.
"""

from __future__ import annotations

import hashlib

_KEY_PERSON = b"lbproxy-key"


def key_hash(key: bytes) -> int:
    """A stable, uniformly distributed 64-bit hash of an affinity key (BLAKE2b-64)."""
    digest = hashlib.blake2b(key, digest_size=8, person=_KEY_PERSON).digest()
    return int.from_bytes(digest, "little")
