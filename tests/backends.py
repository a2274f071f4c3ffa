"""The store backends every conformance test runs on, by URL.

PostgreSQL runs against the server at `$TIDINGS_TEST_POSTGRES` (default
`postgresql://postgres@127.0.0.1:5432/test`), each store in a fresh schema that `discard`
drops afterwards. When the server is absent its cases skip, saying why, except under
`TIDINGS_REQUIRE_SERVICES=1` (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

STORE_BACKENDS = ("memory", "sqlite", "postgres")
BROKER_BACKENDS = ("memory",)
"""Brokers the conformance suite runs on; Redis, RabbitMQ and NATS join as they are built."""
POSTGRES = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("TIDINGS_REQUIRE_SERVICES") == "1"


def store_url(backend: str, folder: Path) -> str:
    """The URL of a fresh, empty store of `backend`, keeping any files in `folder`."""
    if backend == "postgres":
        return f"{POSTGRES}?schema=test_{uuid.uuid4().hex[:16]}"
    return {
        "memory": "memory://",
        "sqlite": f"sqlite:///{folder / 'events.db'}",
    }[backend]


def broker_url(backend: str) -> str:
    """The URL of a broker of `backend` (topics and groups in tests are unique per test)."""
    return {"memory": "memory://"}[backend]


def require(backend: str) -> None:
    """Skip (or, in CI, fail) a test whose backend's server is not running."""
    if backend != "postgres" or _reachable(POSTGRES):
        return
    message = f"PostgreSQL is not running at {_address(POSTGRES)} (set TIDINGS_TEST_POSTGRES)"
    if REQUIRE_SERVICES:
        pytest.fail(message + "; TIDINGS_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(message)


def discard(url: str) -> None:
    """Remove what a store at `url` left on its server (a PostgreSQL test schema)."""
    if not url.startswith("postgres"):
        return
    schema = dict(parse_qsl(urlsplit(url).query))["schema"]
    _in_thread(_drop_schema(url.split("?", 1)[0], schema))


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def _in_thread(coroutine: Any) -> None:
    """Run a coroutine to the end on its own loop, whatever loop this thread runs."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coroutine)
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


@cache
def _reachable(url: str) -> bool:
    try:
        with socket.create_connection(_address(url), timeout=2):
            return True
    except OSError:
        return False
