"""Sticky sessions: where a key went stays where it goes (README "Balancing and affinity").

Bounded loads (bounded.py) decide where a key goes when it is first seen; after that
the key stays, by one of two memories:

- **A signed sticky cookie** (``hash_key = "cookie:NAME"`` with ``sticky_cookie``): the
  value lbproxy inserts names the backend it was issued for, HMAC-signed so a client
  cannot pick a backend: ``NONCE.BACKEND.MAC`` (``BACKEND`` the backend id in unpadded
  URL-safe base64, ``MAC`` the first 16 bytes of HMAC-SHA256 over ``NONCE.BACKEND``). It
  is HAProxy's ``cookie ... insert``: the request goes to that backend while it is up.
  Every lbproxy instance (and every worker) that shares the secret reads the same
  cookie the same way, so the memory lives in the client and needs no shared table.
- **An affinity table** for every other key (``ip``, ``header:``, ``query:``, a client's
  own cookie value): key -> (backend, open connections). A key with open connections on
  a backend keeps going there; when its last connection closes the entry lingers for
  ``linger`` seconds (Socket.IO long-polling has a few milliseconds with no request
  open between two polls), then it is forgotten. Idle entries are bounded in number
  (the oldest go first); entries with open connections are bounded by the connections.

Pure: values in, values out; the caller passes the clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections import OrderedDict

COOKIE_MAC_BYTES = 16
DEFAULT_LINGER = 10.0
MAX_IDLE_ENTRIES = 65536
_CONTEXT = b"lbproxy sticky cookie v1\x00"


def cookie_secret(secret: str, pool_name: str) -> bytes:
    """The HMAC key of a pool's sticky cookies.

    ``secret`` (the pool's ``sticky_secret``) is what instances share to agree on cookies
    no client can forge. Without one the key is derived from the pool name alone: still
    the same on every instance and across restarts and reloads (so no cookie is lost),
    but computable by anyone who knows the pool name.
    """
    material = secret.encode("utf-8") if secret else b"pool\x00" + pool_name.encode("utf-8")
    return hashlib.sha256(_CONTEXT + material).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


class CookieSigner:
    """Issues and reads sticky cookie values (``NONCE.BACKEND.MAC``)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, signed: bytes) -> bytes:
        return hmac.new(self._key, signed, hashlib.sha256).digest()[:COOKIE_MAC_BYTES]

    def issue(self, nonce: str, backend_id: str) -> str:
        """The cookie value for ``nonce`` (no ``.`` in it) stuck to ``backend_id``."""
        if "." in nonce or not nonce:
            raise ValueError(f"sticky cookie nonce {nonce!r}: must be non-empty, without '.'")
        signed = f"{nonce}.{_b64(backend_id.encode('utf-8'))}"
        return f"{signed}.{_b64(self._mac(signed.encode('ascii')))}"

    def read(self, value: bytes) -> tuple[bytes, str] | None:
        """(nonce, backend id) of a validly signed value; None for anything else."""
        if value.count(b".") != 2:
            return None
        signed, _, mac = value.rpartition(b".")
        nonce, _, encoded = signed.partition(b".")
        try:
            given = _unb64(mac)
            if not nonce or not hmac.compare_digest(given, self._mac(signed)):
                return None
            return nonce, _unb64(encoded).decode("utf-8")
        except (ValueError, binascii.Error):  # (UnicodeDecodeError is a ValueError)
            return None


class Stick:
    """One remembered key: its backend and how many connections it has open there."""

    __slots__ = ("backend", "idle_since", "open")

    def __init__(self, backend: str, now: float) -> None:
        self.backend = backend
        self.open = 0
        self.idle_since = now

    def __repr__(self) -> str:
        return f"Stick({self.backend!r}, open={self.open})"


class AffinityTable:
    """key -> Stick for keys with open connections, plus a bounded, lingering idle tail."""

    __slots__ = ("_entries", "_idle", "linger", "max_idle")

    def __init__(self, linger: float = DEFAULT_LINGER, max_idle: int = MAX_IDLE_ENTRIES) -> None:
        self.linger = linger
        self.max_idle = max_idle
        self._entries: dict[bytes, Stick] = {}
        self._idle: OrderedDict[bytes, None] = OrderedDict()  # open == 0, oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: bytes, now: float) -> str | None:
        """The backend ``key`` is stuck to, or None (never seen, or forgotten)."""
        self._expire(now)
        entry = self._entries.get(key)
        return None if entry is None else entry.backend

    def opened(self, key: bytes, backend: str, now: float) -> Stick:
        """A connection with ``key`` opened on ``backend``; keep the Stick for ``closed``.

        A key seen on another backend than the remembered one (that one was down or
        excluded) is remembered on the new one from now on.
        """
        entry = self._entries.get(key)
        if entry is None or entry.backend != backend:
            if entry is not None and entry.open == 0:
                del self._idle[key]
            entry = self._entries[key] = Stick(backend, now)
        elif entry.open == 0:
            del self._idle[key]
        entry.open += 1
        self._expire(now)
        return entry

    def forget(self, key: bytes) -> None:
        """Forget ``key`` (its open connections are being moved): the next one goes to the
        key's home. The open ones' ``closed`` then finds nothing to count."""
        if self._entries.pop(key, None) is not None:
            self._idle.pop(key, None)

    def closed(self, key: bytes, entry: Stick, now: float) -> None:
        """The connection ``opened`` returned ``entry`` for has closed."""
        if self._entries.get(key) is not entry:
            return  # the key moved to another backend since: nothing to count
        entry.open -= 1
        if entry.open <= 0:
            entry.open = 0
            entry.idle_since = now
            self._idle[key] = None
        self._expire(now)

    def _expire(self, now: float) -> None:
        idle = self._idle
        entries = self._entries
        while idle:
            oldest = next(iter(idle))
            if len(idle) <= self.max_idle and now - entries[oldest].idle_since < self.linger:
                break
            del idle[oldest]
            del entries[oldest]
