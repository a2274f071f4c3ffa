"""Event stores, chosen by URL: `open_store("sqlite:///app.db")`, `"memory://"`, `"postgresql://…"`.

Backend modules are imported only when their scheme is used, so `import tidings` never loads a
database driver.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tidings.core.errors import ConfigurationError
from tidings.core.urls import Backends, backend_class
from tidings.store.base import StoreBase as StoreBase
from tidings.store.checkpoints import ProjectionState as ProjectionState
from tidings.store.contracts import ANY as ANY
from tidings.store.contracts import NO_STREAM as NO_STREAM
from tidings.store.contracts import STREAM_EXISTS as STREAM_EXISTS
from tidings.store.contracts import AppendResult as AppendResult
from tidings.store.contracts import EventStore as EventStore
from tidings.store.contracts import ExpectedVersion as ExpectedVersion
from tidings.store.contracts import QueryResult as QueryResult
from tidings.store.contracts import StreamInfo as StreamInfo
from tidings.store.contracts import StreamState as StreamState
from tidings.store.snapshots import Snapshot as Snapshot

__all__ = [  # by role: opening, the protocol, its arguments, what reads return
    "open_store",
    "EventStore",
    "StoreBase",
    "ExpectedVersion",
    "StreamState",
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "QueryResult",
    "StreamInfo",
    "Snapshot",
    "ProjectionState",
]

BACKENDS: Backends = {
    "memory": ("tidings.store.memory", "MemoryEventStore", None, None),
    "sqlite": ("tidings.store.sqlite", "SQLiteEventStore", None, None),
    "postgresql": ("tidings.store.postgres", "PostgresEventStore", "asyncpg", "postgres"),
    "postgres": ("tidings.store.postgres", "PostgresEventStore", "asyncpg", "postgres"),
}


def open_store(url: str, **options: Any) -> EventStore:
    """The event store for `url`, ready for `async with` (or `await store.open()`).

    Options go in the URL's query (`sqlite:///app.db?synchronous=normal`) or as keywords
    (`codec=`, `max_event_size=`, …); keywords win. Nothing is opened until `open()`.
    """
    if not isinstance(url, str) or ("://" not in url and not url.startswith("memory:")):
        raise ConfigurationError(
            f"{url!r} is not a store URL; use sqlite:///path.db, postgresql://host/db or memory://"
        )
    scheme = urlsplit(url).scheme.lower()
    cls = backend_class(
        BACKENDS,
        scheme,
        unknown=f"unknown store scheme {scheme!r} in {url!r}; known: ",
        needs="driver",
    )
    store: EventStore = cls.from_url(url, **options)
    return store
