"""The store backends every conformance test runs on, by URL.

PostgreSQL runs against the server at `$TIDINGS_TEST_POSTGRES` (default
`postgresql://postgres@127.0.0.1:5432/test`), each store in a fresh schema that `discard`
drops afterwards; the brokers against Redis (`$TIDINGS_TEST_REDIS`) and NATS JetStream
(`$TIDINGS_TEST_NATS`) on loopback. When a server is absent its cases skip, saying why,
except under `TIDINGS_REQUIRE_SERVICES=1` (CI), where they fail.
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
BROKER_BACKENDS = tuple(
    os.environ.get("TIDINGS_TEST_BROKERS", "memory,redis,nats,rabbitmq").split(",")
)
"""Brokers the conformance suite runs on (`TIDINGS_TEST_BROKERS=redis,nats` picks fewer)."""
POSTGRES = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("TIDINGS_TEST_REDIS", "redis://127.0.0.1:6379/0")
NATS = os.environ.get("TIDINGS_TEST_NATS", "nats://127.0.0.1:4222")
RABBITMQ = os.environ.get("TIDINGS_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
SERVERS = {  # backend: (server URL, what to call it, the variable that moves it)
    "postgres": (POSTGRES, "PostgreSQL", "TIDINGS_TEST_POSTGRES"),
    "redis": (REDIS, "Redis", "TIDINGS_TEST_REDIS"),
    "nats": (NATS, "NATS JetStream", "TIDINGS_TEST_NATS"),
    "rabbitmq": (RABBITMQ, "RabbitMQ", "TIDINGS_TEST_RABBITMQ"),
}
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
    return {
        "memory": "memory://",
        "redis": REDIS,
        "nats": f"{NATS}?group_expiry=60&max_age=3600",  # unique test groups: let them go
        "rabbitmq": f"{RABBITMQ}?expires=60",
    }[backend]


def require(backend: str) -> None:
    """Skip (or, in CI, fail) a test whose backend's server is not running."""
    if backend not in SERVERS or _reachable(SERVERS[backend][0]):
        return
    url, name, variable = SERVERS[backend]
    message = f"{name} is not running at {_address(url)} (set {variable})"
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


_DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "redis": 6379, "nats": 4222, "amqp": 5672}


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or _DEFAULT_PORTS[parts.scheme]


@cache
def _reachable(url: str) -> bool:
    try:
        with socket.create_connection(_address(url), timeout=2):
            return True
    except OSError:
        return False
