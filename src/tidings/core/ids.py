"""UUIDv7 event ids: time-ordered, so ids sort by creation time and index cheaply.

Python 3.11 has no `uuid.uuid7`; this follows RFC 9562 (method 1: a 12-bit counter in
`rand_a` keeps ids strictly increasing within one process, even within one millisecond).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any
from uuid import UUID, SafeUUID

__all__ = ["own_id", "uuid7", "uuid_from_bytes"]

_lock = threading.Lock()
_last_ms = 0
_counter = 0
_POOL = 4096  # random bytes drawn per system call: 512 ids
_pool = b""
_taken = _POOL


def _forget_pool() -> None:
    global _taken
    _taken = _POOL  # a forked child must not reuse its parent's random bytes


os.register_at_fork(after_in_child=_forget_pool)


def uuid7() -> UUID:
    """Return a new UUIDv7, strictly greater than any earlier one from this process."""
    global _last_ms, _counter, _pool, _taken
    with _lock:
        if _taken >= _POOL:  # one os.urandom per 512 ids: a system call each is a tenth
            _pool, _taken = os.urandom(_POOL), 0  # of the cost of publishing an event
        rand_b = int.from_bytes(_pool[_taken : _taken + 8], "big") & 0x3FFF_FFFF_FFFF_FFFF
        _taken += 8
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = rand_b >> 52  # 10 random bits leave room to count up within the ms
        else:
            _counter += 1
            if _counter > 0xFFF:
                _last_ms += 1  # borrow the next millisecond rather than repeat or go back
                _counter = 0
        ms, counter = _last_ms, _counter
    return UUID(int=(ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b)


_new = object.__new__
_set = object.__setattr__
_from_bytes = int.from_bytes
_UNKNOWN = SafeUUID.unknown


def uuid_from_bytes(raw: bytes) -> UUID:
    """`UUID(bytes=raw)` without its argument checks, for ids read back from a database.

    Decoding a million stored events builds a million UUIDs; the checked constructor costs
    more than twice as much. Anything but 16 bytes (a row written around tidings) is a
    `ValueError` rather than a wrong id.
    """
    if len(raw) != 16:
        raise ValueError(f"a stored event id is 16 bytes, not {raw!r:.60}")
    value = _new(UUID)
    _set(value, "int", _from_bytes(raw, "big"))
    _set(value, "is_safe", _UNKNOWN)
    return value


def own_id(model: Any) -> UUID:
    """A pydantic model's own id, a UUIDv7 fixed the first time it is asked for.

    Kept in pydantic's private slot, not a declared PrivateAttr: declaring one makes pydantic
    run Python code on every validation, which doubles the cost of decoding an event."""
    private = model.__pydantic_private__
    if private is None:
        private = {"_id": uuid7()}
        object.__setattr__(model, "__pydantic_private__", private)
    return private["_id"]  # type: ignore[no-any-return]
