"""The store backends every conformance test runs on, by URL.

Server-backed backends join here in their own issues, together with the switch that turns a
missing server into a skip, or into a failure under `TIDINGS_REQUIRE_SERVICES=1` (CI).
"""

from __future__ import annotations

from pathlib import Path

STORE_BACKENDS = ("memory", "sqlite")


def store_url(backend: str, folder: Path) -> str:
    """The URL of a fresh, empty store of `backend`, keeping any files in `folder`."""
    return {
        "memory": "memory://",
        "sqlite": f"sqlite:///{folder / 'events.db'}",
    }[backend]
