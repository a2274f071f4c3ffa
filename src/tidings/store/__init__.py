"""Event stores, chosen by URL: `open_store("sqlite:///app.db")`, `"memory://"`, `"postgresql://…"`.

Backend modules are imported only when their scheme is used, so `import tidings` never loads a
database driver.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any
from urllib.parse import urlsplit

from tidings.core.errors import ConfigurationError
from tidings.store.base import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    EventStore,
    ExpectedVersion,
    ProjectionState,
    Snapshot,
    StoreBase,
    StreamInfo,
    StreamState,
)

__all__ = [
    "ANY",
    "AppendResult",
    "EventStore",
    "ExpectedVersion",
    "NO_STREAM",
    "ProjectionState",
    "STREAM_EXISTS",
    "Snapshot",
    "StoreBase",
    "StreamInfo",
    "StreamState",
    "open_store",
]

# scheme -> (module, class, driver module, extra that installs the driver)
BACKENDS: dict[str, tuple[str, str, str | None, str | None]] = {
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
    if scheme not in BACKENDS:
        known = ", ".join(f"{name}://" for name in BACKENDS)
        raise ConfigurationError(f"unknown store scheme {scheme!r} in {url!r}; known: {known}")
    module_name, class_name, driver, extra = BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if driver is not None and importlib.util.find_spec(driver) is None:
            raise ConfigurationError(
                f'{scheme}:// needs the {driver} driver: pip install "tidings[{extra}]"'
            ) from exc
        raise
    store: EventStore = getattr(module, class_name).from_url(url, **options)
    return store
