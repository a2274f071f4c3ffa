"""Soak: steady load through the store, the outbox relay, the broker, a projection and a
consumer, each in its own process, for 10 minutes (`make reliability`; 20 s in `make test`).

Every second the test samples each process's resident memory and three lags: the
projection's and the relay's checkpoints behind the head of the log, and the consumer's
applied effects behind the events written. It passes when nothing was lost or applied twice,
the read model equals a replay, and neither memory nor lag grew: the last third of the run
peaks no higher than the first third, with a small allowance.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.backends import POSTGRES, broker_url, require
from tests.reliability.harness import Row, reliability, report, scale
from tests.reliability.soak_parts import CODEC, SoakTotals, Ticked
from tidings import ReadModel, open_broker, open_store

pytestmark = [
    reliability,
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc for memory"),
]

SECONDS = scale(12, 600)
RATE = scale(100, 200)  # events a second
TOPIC = "soak"
BARS = "▁▂▃▄▅▆▇█"
ROOT = Path(__file__).resolve().parents[2]
NAMES = {"sqlite+redis": "SQLite + Redis", "postgres+nats": "PostgreSQL + NATS"}


@dataclass
class Samples:
    """What the test saw each second."""

    rss: dict[str, list[float]] = field(default_factory=dict)  # MB per process
    lag: dict[str, list[int]] = field(default_factory=dict)  # events per follower

    def add(self, table: dict[str, list], key: str, value: object) -> None:  # type: ignore[type-arg]
        table.setdefault(key, []).append(value)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def spark(values: list[float] | list[int], width: int = 24) -> str:
    """A one-line chart of `values` (their maxima in `width` buckets)."""
    if not values:
        return ""
    size = max(1, len(values) // width)
    peaks = [max(values[i : i + size]) for i in range(0, len(values), size)]
    top = max(peaks) or 1
    return "".join(BARS[min(len(BARS) - 1, int(v / top * (len(BARS) - 1)))] for v in peaks)


def thirds(values: list[float] | list[int]) -> tuple[float, float]:
    """The peak of the first third and of the last third of `values`."""
    third = max(1, len(values) // 3)
    return max(values[:third]), max(values[-third:])


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=ROOT,  # so `-m tests.reliability...` imports
    )


@pytest.mark.parametrize("backend", ["sqlite+redis", "postgres+nats"])
async def test_steady_load_keeps_memory_and_lag_flat(backend: str, tmp_path: Path) -> None:
    store_kind, broker_kind = backend.split("+")
    require(broker_kind)
    if store_kind == "postgres":
        require("postgres")
        store_url = f"{POSTGRES}?schema=soak_{uuid.uuid4().hex[:12]}"
    else:
        store_url = f"sqlite:///{tmp_path / 'events.db'}"
    seconds = SECONDS if store_kind == "sqlite" else scale(12, 120)  # the long soak: SQLite
    bus = broker_url(broker_kind)  # the topic is unique to this run
    topic = f"{TOPIC}-{uuid.uuid4().hex[:8]}"
    inbox_url = f"sqlite:///{tmp_path / 'consumer.db'}"
    samples = Samples()
    processes: dict[str, asyncio.subprocess.Process] = {}
    async with (
        open_store(store_url, codec=CODEC) as store,
        open_broker(bus, codec=CODEC) as broker,
    ):
        await broker.declare(topic, "soak")
        try:
            processes["consumer"] = await spawn(
                "-m", "tests.reliability.soak_parts", "consumer", bus, topic, inbox_url
            )
            processes["relay"] = await spawn(
                "-m", "tidings.cli.main", "relay", "--store", store_url, "--broker", bus,
                "--route", f"soak.*={topic}", "--name", "soak",
            )  # fmt: skip
            processes["worker"] = await spawn(
                "-m", "tidings.cli.main", "worker", "--app", "tests.reliability.soak_parts",
                "--store", store_url,
            )  # fmt: skip
            for name in ("consumer", "relay", "worker"):
                stdout = processes[name].stdout
                assert stdout is not None
                async with asyncio.timeout(30):
                    assert await stdout.readline(), f"the {name} exited at start"
            processes["writer"] = writer = await spawn(
                "-m", "tests.reliability.soak_parts", "writer", store_url, str(RATE), str(seconds)
            )  # fmt: skip
            started = time.monotonic()
            while writer.returncode is None:
                await sample(samples, processes, store, tmp_path / "consumer.db")
                try:
                    async with asyncio.timeout(1):
                        await writer.wait()
                except TimeoutError:
                    pass
            assert writer.returncode == 0
            assert writer.stdout is not None
            written = int((await writer.stdout.read()).split()[-1])
            ran = time.monotonic() - started
            async with asyncio.timeout(120):  # the followers finish what is left
                while True:
                    head = await store.last_position()
                    done = [
                        await position(store, "soak_totals"),
                        await position(store, "outbox:soak"),
                    ]
                    if done == [head, head] and effects(tmp_path / "consumer.db")[1] >= written:
                        break
                    await asyncio.sleep(0.2)
        finally:
            for process in processes.values():
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes.values():
                try:
                    async with asyncio.timeout(20):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()

        replay: dict[str, dict[str, int]] = {}
        async for record in store.read_all():
            assert isinstance(record.event, Ticked)
            doc = replay.setdefault(record.stream_id, {"count": 0, "sum": 0})
            doc["count"] += 1
            doc["sum"] += record.event.amount
        stored = sum(doc["count"] for doc in replay.values())
        assert await ReadModel(store, SoakTotals).all() == replay
        if store_kind == "postgres":
            await store._pool.execute(f"drop schema {store.schema} cascade")  # type: ignore[attr-defined]

    applied, distinct = effects(tmp_path / "consumer.db")
    notes = []
    for name, values in samples.rss.items():
        first, last = thirds(values)
        notes.append(f"{name} peak {max(values):.0f} MB")
        assert last <= first * 1.25 + 8, (
            f"{name}'s memory grew: {spark(values)} ({first:.0f} -> {last:.0f} MB)"
        )
    for name, values in samples.lag.items():
        first, last = thirds(values)
        notes.append(f"{name} lag max {max(values)} {spark(values)}")
        assert last <= max(2 * first, 2 * RATE), f"{name}'s lag grew: {spark(values)}"
    report(
        Row(
            scenario="Soak: steady load through store, relay, broker, projection, consumer",
            backend={"sqlite+redis": "SQLite + Redis", "postgres+nats": "PostgreSQL + NATS"}[
                backend
            ],
            load=f"{RATE} events/s for {ran:.0f} s, 50 streams, 5 processes",
            faults="none: memory (RSS, per process) and lag (events) sampled each second",
            events_in=written,
            events_out=distinct,
            lost=written - distinct + (written - stored),
            duplicated=applied - distinct,
            notes="; ".join(notes),
            seconds=ran,
        )
    )


async def position(store: object, name: str) -> int:
    state = await store.projection_state(name)  # type: ignore[attr-defined]
    return 0 if state is None else int(state.position)


def effects(path: Path) -> tuple[int, int]:
    """(effects applied, distinct events applied) in the consumer's database."""
    if not path.exists():
        return 0, 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("select count(*), count(distinct n) from effects").fetchone()
    except sqlite3.OperationalError:  # not created yet
        return 0, 0
    finally:
        conn.close()
    return int(row[0]), int(row[1])


async def sample(
    samples: Samples,
    processes: dict[str, asyncio.subprocess.Process],
    store: object,
    consumer_db: Path,
) -> None:
    for name, process in processes.items():
        if process.returncode is None:
            try:
                samples.add(samples.rss, name, rss_mb(process.pid))
            except FileNotFoundError:
                pass
    head = await store.last_position()  # type: ignore[attr-defined]
    samples.add(samples.lag, "projection", head - await position(store, "soak_totals"))
    samples.add(samples.lag, "relay", head - await position(store, "outbox:soak"))
    samples.add(samples.lag, "consumer", head - effects(consumer_db)[1])
