"""Shared fixtures: a fresh store of every backend in `tests.backends`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidings
from tests.backends import STORE_BACKENDS, discard, require
from tests.backends import store_url as backend_url


@pytest.fixture(params=STORE_BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty store of each backend (dropped afterwards)."""
    require(request.param)
    url = backend_url(request.param, tmp_path)
    yield url
    discard(url)


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


@pytest.fixture(params=["sqlite", "postgres"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store that other processes can open too (not `memory://`), dropped after."""
    require(request.param)
    url = backend_url(request.param, tmp_path)
    yield url
    discard(url)
