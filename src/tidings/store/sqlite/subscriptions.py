"""Waking and polling: how appends reach this store's subscribers.

Stores on the same file in one process share one `AppendSignal`, so an append through any of
them wakes the subscribers of all. Other processes may write the same file too; their appends
reach this process's subscribers by polling (`shared_across_processes` on the store).
"""

from __future__ import annotations

import os
import threading
import weakref

from tidings.store.base import AppendSignal
from tidings.store.sqlite.connection import SQLiteCore

# One signal per database file, so stores on the same file in one process wake each other.
_signals: weakref.WeakValueDictionary[str, AppendSignal] = weakref.WeakValueDictionary()
_signals_lock = threading.Lock()


def _shared_signal(path: str) -> AppendSignal:
    """The one `AppendSignal` of the database file at `path` in this process."""
    with _signals_lock:
        key = os.path.realpath(path)
        signal = _signals.get(key)
        if signal is None:
            signal = _signals[key] = AppendSignal()
    return signal


class SQLiteSubscriptions(SQLiteCore):
    """Subscribers also poll: another process may append to the same file."""

    shared_across_processes = True
