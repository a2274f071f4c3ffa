"""Fixtures of the PostgreSQL store tests: fresh schemas, dropped afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.backends import discard, require, store_url


@pytest.fixture
def new_url(tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Make URLs of fresh, empty schemas; every one is dropped after the test."""
    require("postgres")
    made: list[str] = []

    def make() -> str:
        made.append(store_url("postgres", tmp_path))
        return made[-1]

    yield make
    for url in made:
        discard(url)


@pytest.fixture
def pg_url(new_url: Callable[[], str]) -> str:
    return new_url()
