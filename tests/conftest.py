"""Shared fixtures: every store backend by URL, and the services switch."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import tidings

REQUIRE_SERVICES = os.environ.get("TIDINGS_REQUIRE_SERVICES") == "1"


def store_urls(tmp_path: Path) -> dict[str, str]:
    """One URL per store backend; server-backed ones join here in their own issues."""
    return {
        "memory": "memory://",
        "sqlite": f"sqlite:///{tmp_path / 'events.db'}",
    }


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh, empty store of each backend."""
    return store_urls(tmp_path)[request.param]


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[tidings.EventStore]:
    """A fresh, open store of each backend."""
    async with tidings.open_store(store_url) as opened:
        yield opened


@pytest.fixture
def open_store(store_url: str) -> Callable[..., tidings.EventStore]:
    """Open the parametrised backend again with other options (same place)."""

    def factory(**options: Any) -> tidings.EventStore:
        return tidings.open_store(store_url, **options)

    return factory
