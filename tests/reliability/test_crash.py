"""Crash: SIGKILL a projection runner, an outbox relay, a consumer and a writer at random
moments while load runs, on SQLite and on PostgreSQL; after recovery nothing is lost and no
effect happened twice.

The pipeline, each part its own process (`crash_parts.py` forks them from a launcher that
imported everything once, so a restart costs milliseconds, not an interpreter start):

    writer (Repository, 4 tasks) -> store -> `tidings worker` (projection `crash_ledger`)
                                          -> `tidings relay` -> broker -> consumer (2 groups,
                                             each behind an inbox, effects in its database)

SQLite goes with Redis; PostgreSQL with RabbitMQ or NATS, depending on the part killed.
Under `make reliability` each part is the victim of its own scenario on each store, 50
SIGKILLs each (8 rows); under `make test` three scenarios (SQLite + Redis, PostgreSQL +
RabbitMQ, PostgreSQL + NATS) kill the four parts in turn, 12 SIGKILLs each. After each kill
the part is started again at once; its recovery time runs from the kill to the new process
moving on (a checkpoint advancing, an effect applied, an append acknowledged). Most kills
land a random while after the part moved on again, some as soon as it did (amid what piled
up while it was down), some while it is still starting. A kill from outside rarely lands
inside a 1 ms append, so half the writer's are aimed: it is told (SIGUSR1) to SIGKILL itself
0 to 3 ms into its next append.

Then load stops, everything catches up, and the test checks: the projection's read model
equals a clean replay of the store (a fresh runner, and `fold`, the same rules as a plain
loop); every stored event has exactly one effect in each consumer group, applied in its
stream's order (the effects table logs every effect, keyed only by a sequence number, so the
inbox is what keeps it single); the balances group's table equals the replay; every append
the writer saw acknowledged is stored; and every append is all or nothing (each event carries
its batch id and size).

The seed is printed; `TIDINGS_CRASH_SEED=<seed>` replays the same choices.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.backends import POSTGRES, REDIS, broker_url, discard, require
from tests.reliability.crash_parts import (
    CODEC,
    GROUPS,
    TOTALS,
    WRITER_TASKS,
    Ledger,
    LedgerReplay,
    Moved,
    fold,
)
from tests.reliability.harness import LONG, Row, reliability, report, scale
from tidings import ProjectionRunner, ReadModel, RecordedEvent, open_broker, open_store

pytestmark = [
    reliability,
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="forks parts, PR_SET_PDEATHSIG, SIGKILL"),
]

PARTS = ("projection", "relay", "consumer", "writer")
KILLS = scale(12, 50)
RATE = scale(60, 100)  # events a second, all writer tasks together
LEASE = 1.0  # seconds: the relay's and the worker's lease (a restart waits for it)
BATCH = 20  # events per relay and projection transaction
STARTUP_KILLS = 0.15  # the share of kills that land while the part is still starting
BURST_KILLS = 0.3  # the share that land as soon as it moved on (amid its catching up)
AIMED_KILLS = 0.5  # the share of writer kills aimed inside an append
RECOVER_LIMIT = 60.0  # seconds for one part to make progress after a kill
DRAIN_LIMIT = scale(60, 180)  # seconds for everything to catch up after the load
ROOT = Path(__file__).resolve().parents[2]
RELAY_NAME = "crash"
NAMES = {
    "projection": "the projection runner (`tidings worker`)",
    "relay": "the outbox relay (`tidings relay`)",
    "consumer": "the consumer (`Service`, 2 groups behind an inbox)",
    "writer": "the writer (`Repository` appends)",
    "all": "each part in turn (projection runner, relay, consumer, writer)",
}
# PostgreSQL meets RabbitMQ when the relay dies (its re-publishes are not dropped by id, so
# the inbox must skip them) and NATS when the consumer dies (ack_wait redelivery).
CASES = (
    [
        ("projection", "sqlite", "redis"),
        ("relay", "sqlite", "redis"),
        ("consumer", "sqlite", "redis"),
        ("writer", "sqlite", "redis"),
        ("projection", "postgres", "rabbitmq"),
        ("relay", "postgres", "rabbitmq"),
        ("consumer", "postgres", "nats"),
        ("writer", "postgres", "nats"),
    ]
    if LONG
    else [  # the short run kills every part in turn, one scenario per store and broker
        ("all", "sqlite", "redis"),
        ("all", "postgres", "rabbitmq"),
        ("all", "postgres", "nats"),
    ]
)
BROKER_NAMES = {"redis": "Redis", "nats": "NATS JetStream", "rabbitmq": "RabbitMQ"}


class Launcher:
    """The test's end of `crash_parts.py launcher`: start, SIGKILL and stop parts by name."""

    def __init__(self, process: asyncio.subprocess.Process, logdir: Path) -> None:
        self.process = process
        self.logdir = logdir
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.exits: dict[str, list[int]] = defaultdict(list)
        self.stopping: set[str] = set()
        self.unexpected: list[str] = []
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, logdir: Path) -> Launcher:
        errors = (logdir / "launcher.log").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.reliability.crash_parts", "launcher", str(logdir),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=errors,
                cwd=ROOT,
            )  # fmt: skip
        finally:
            errors.close()
        launcher = cls(process, logdir)
        reply = await launcher._reply()
        assert "ready" in reply, reply
        return launcher

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            message = json.loads(line)
            if "exited" in message:
                name = message["exited"]
                self.exits[name].append(message["status"])
                if name not in self.stopping:
                    self.unexpected.append(f"{name} exited by itself ({message['status']})")
            else:
                self.replies.put_nowait(message)

    async def _reply(self) -> dict[str, Any]:
        async with asyncio.timeout(30):
            return await self.replies.get()

    async def _call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await self._reply()

    async def run(self, name: str, role: str, *args: str) -> None:
        self.stopping.discard(name)
        reply = await self._call(op="start", name=name, role=role, args=list(args))
        assert reply.get("started") == name, reply

    async def kill(self, name: str) -> None:
        """SIGKILL `name` and wait until it is gone (reaped by the launcher)."""
        reply = await self._call(op="kill", name=name)
        assert reply.get("killed") == name, reply

    async def aim(self, name: str, timeout: float = 10.0) -> None:
        """SIGUSR1 `name` (a writer: it SIGKILLs itself inside its next append) and wait
        until it is gone; SIGKILL it if it did not go within `timeout`."""
        self.stopping.add(name)
        seen = len(self.exits[name])
        reply = await self._call(op="signal", name=name, signal=signal.SIGUSR1)
        assert reply.get("running"), reply
        deadline = time.monotonic() + timeout
        while len(self.exits[name]) == seen and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        if len(self.exits[name]) == seen:
            await self.kill(name)
        else:
            assert self.exits[name][-1] == -signal.SIGKILL, self.exits[name]

    async def stop(self, name: str, timeout: float = 30.0) -> int | None:
        """SIGTERM `name` and wait for it to exit; SIGKILL after `timeout`. Its exit code."""
        self.stopping.add(name)
        seen = len(self.exits[name])
        reply = await self._call(op="signal", name=name, signal=signal.SIGTERM)
        if not reply.get("running"):
            return None
        deadline = time.monotonic() + timeout
        while len(self.exits[name]) == seen and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if len(self.exits[name]) == seen:
            await self.kill(name)
            return -9
        return self.exits[name][-1]

    async def close(self) -> None:
        """Close its stdin: it SIGKILLs and reaps whatever still runs, then exits."""
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                async with asyncio.timeout(30):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()  # its parts die with it (PR_SET_PDEATHSIG)
                await self.process.wait()
        await self.reader

    def tail(self, name: str, lines: int = 25) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return f"({name}: no log)"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {name}.log (last {len(text)} lines):\n" + "\n".join(text)


@dataclass
class Acks:
    """What the writers wrote down: appends begun, and appends acknowledged."""

    path: Path
    offset: int = 0
    begun: dict[str, int] = field(default_factory=dict)  # batch -> line number
    acked: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    def read(self) -> int:
        """Read what was appended since the last call; the number of acknowledged appends."""
        if self.path.exists():
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read()
            end = data.rfind(b"\n") + 1  # a whole line at a time
            self.offset += end
            for line in data[:end].decode().splitlines():
                kind, batch, *rest = line.split()
                if kind == "begin":
                    self.begun[batch] = len(self.begun)
                else:
                    stream, first, last = rest
                    self.acked[batch] = (stream, int(first), int(last))
        return len(self.acked)

    def in_flight(self, run: int) -> list[str]:
        """The batches writer run `run` had begun and not seen acknowledged."""
        prefix = f"{run}."
        return [b for b in self.begun if b.startswith(prefix) and b not in self.acked]


class Pipeline:
    """One scenario's store, broker, inbox and parts, and how to tell each part moved on."""

    def __init__(self, kind: str, broker_kind: str, folder: Path, seed: int) -> None:
        self.kind = kind
        self.broker_kind = broker_kind
        self.folder = folder
        self.seed = seed
        run = uuid.uuid4().hex[:10]
        self.topic = f"crash-{run}"
        if kind == "postgres":
            self.store_url = f"{POSTGRES}?schema=crash_{run}"
            self.inbox_schema = f"crash_inbox_{run}"
            self.inbox_url = f"{POSTGRES}?schema={self.inbox_schema}"
        else:
            self.store_url = f"sqlite:///{folder / 'events.db'}"
            self.inbox_url = f"sqlite:///{folder / 'inbox.db'}"
        if broker_kind == "redis":
            self.redis_prefix = f"crash-{run}"
            self.broker_url = f"{REDIS}?prefix={self.redis_prefix}&lease=1"
        elif broker_kind == "nats":
            self.broker_url = broker_url("nats") + "&ack_wait=3"
        else:
            self.broker_url = broker_url("rabbitmq")
        self.logdir = folder / "logs"
        self.logdir.mkdir()
        self.acks = Acks(folder / "acks.log")
        self.writer_runs = 0
        self.interrupted: list[str] = []  # batches in flight when a writer was killed
        self.aimed = 0  # writer kills aimed inside an append
        self.store: Any = None
        self.broker: Any = None
        self.launcher: Launcher | None = None
        self._inbox_db: Any = None

    # -- the parts -------------------------------------------------------------------------

    async def start(self, part: str) -> None:
        assert self.launcher is not None
        if part == "projection":
            await self.launcher.run(
                part, "tidings", "worker", "--app", "tests.reliability.crash_parts:Ledger",
                "--store", self.store_url, "--lease", str(LEASE), "--batch-size", str(BATCH),
            )  # fmt: skip
        elif part == "relay":
            await self.launcher.run(
                part, "tidings", "relay", "--store", self.store_url, "--broker", self.broker_url,
                "--route", f"crash.*={self.topic}", "--name", RELAY_NAME, "--lease", str(LEASE),
                "--batch-size", str(BATCH),
            )  # fmt: skip
        elif part == "consumer":
            await self.launcher.run(
                part, "consumer", self.broker_url, self.topic, self.inbox_url,
                str(self.folder / "skips.log"),
            )  # fmt: skip
        else:
            self.writer_runs += 1
            await self.launcher.run(
                part, "writer", self.store_url, str(self.acks.path), str(self.writer_runs),
                str(self.seed + self.writer_runs), str(RATE),
            )  # fmt: skip

    async def kill(self, part: str, aimed: bool = False) -> None:
        """SIGKILL `part`; `aimed`: the writer, inside an append (see crash_parts.py)."""
        assert self.launcher is not None
        if aimed:
            await self.launcher.aim(part)
            self.aimed += 1
        else:
            await self.launcher.kill(part)
        if part == "writer":
            self.acks.read()
            self.interrupted += self.acks.in_flight(self.writer_runs)

    async def progress(self, part: str) -> int:
        """A number that grows only when `part` gets work done."""
        if part == "projection":
            return await self._checkpoint(Ledger.name)
        if part == "relay":
            return await self._checkpoint(f"outbox:{RELAY_NAME}")
        if part == "consumer":
            return await self._effects_seq()
        return self.acks.read()

    async def _checkpoint(self, name: str) -> int:
        state = await self.store.projection_state(name)
        return 0 if state is None else int(state.position)

    async def _inbox_query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of `sql` on the consumer's inbox database ([] before its tables exist)."""
        if self.kind == "postgres":
            import asyncpg  # type: ignore[import-untyped]

            if self._inbox_db is None:
                self._inbox_db = await asyncpg.connect(
                    POSTGRES, server_settings={"search_path": self.inbox_schema}
                )
            try:
                return [tuple(row) for row in await self._inbox_db.fetch(sql)]
            except asyncpg.UndefinedTableError:
                return []
        path = self.folder / "inbox.db"
        if not path.exists():
            return []
        if self._inbox_db is None:
            self._inbox_db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return list(self._inbox_db.execute(sql).fetchall())
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise

    async def _effects_seq(self) -> int:
        rows = await self._inbox_query("select coalesce(max(seq), 0) from crash_effects")
        return int(rows[0][0]) if rows else 0

    async def distinct_effects(self) -> dict[str, int]:
        rows = await self._inbox_query(
            "select grp, count(distinct event_id) from crash_effects group by grp"
        )
        return {group: int(n) for group, n in rows}

    # -- cleaning up -----------------------------------------------------------------------

    async def close(self) -> None:
        if self.launcher is not None:
            await self.launcher.close()
        if self._inbox_db is not None:
            closing = self._inbox_db.close()
            if isinstance(closing, Awaitable):
                await closing
        if self.broker is not None:
            try:
                await self._clean_broker()
            finally:
                await self.broker.aclose()
        if self.store is not None:
            await self.store.aclose()
        if self.kind == "postgres":
            discard(self.store_url)
            discard(self.inbox_url)

    async def _clean_broker(self) -> None:
        broker = self.broker
        if self.broker_kind == "redis":
            client = broker._client
            keys = [key async for key in client.scan_iter(match=f"{self.redis_prefix}:*")]
            if keys:
                await client.delete(*keys)
        elif self.broker_kind == "nats":
            _, js = broker._connection()
            for group in GROUPS:
                for lane in broker._lanes:
                    try:
                        await js.delete_consumer(
                            broker.stream, broker._durable(self.topic, group, lane)
                        )
                    except Exception:  # gone already (they expire anyway)
                        pass
            await js.purge_stream(broker.stream, subject=f"{broker.prefix}.{self.topic}.>")
        # RabbitMQ: the group queues expire (`?expires=60`), the exchange goes with them.


async def wait_for(
    what: str, ready: Callable[[], Awaitable[bool]], timeout: float, launcher: Launcher
) -> float:
    """Poll `ready` until true; the time it took. Fails with the parts' logs on timeout."""
    started = time.monotonic()
    while not await ready():
        if launcher.unexpected:
            raise AssertionError(
                f"{'; '.join(launcher.unexpected)} while waiting for {what}\n"
                + "\n".join(launcher.tail(part) for part in PARTS)
            )
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"{what}: not within {timeout:.0f}s\n"
                + "\n".join(launcher.tail(part) for part in PARTS)
            )
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@dataclass
class Chaos:
    """What the chaos loop did."""

    kills: int = 0
    starting: int = 0  # kills of a part that had not moved on since it was started
    burst: int = 0  # kills as soon as it had
    slowest: float = 0.0  # seconds, the longest recovery

    def describe(self, victim: str) -> str:
        return (
            f"{self.kills} SIGKILLs of {NAMES[victim]} at random moments: {self.starting} while "
            f"starting, {self.burst} as soon as it moved on, the rest 0.05-0.7 s after"
        )


async def chaos(pipe: Pipeline, victim: str, rng: random.Random) -> Chaos:
    """KILLS SIGKILLs of `victim`'s part(s), each restarted at once.

    Most kills land a random while after the part moved on again, some as soon as it did
    (while it works off what piled up meanwhile), some while it is still starting, before it
    did anything (its recovery then counts from the first kill).
    """
    launcher = pipe.launcher
    assert launcher is not None
    parts = list(PARTS) if victim == "all" else [victim]
    down: dict[str, tuple[float, int]] = {}  # part -> (killed at, its progress then)
    done = Chaos()

    async def recovered() -> bool:
        for part, (killed_at, before) in list(down.items()):
            if await pipe.progress(part) > before:
                done.slowest = max(done.slowest, time.monotonic() - killed_at)
                del down[part]
        return not down

    for kill in range(KILLS):
        part = parts[kill % len(parts)]
        if down and rng.random() < STARTUP_KILLS:
            await asyncio.sleep(rng.uniform(0.0, 0.3))
        else:
            await wait_for(f"recovery from kill {kill}", recovered, RECOVER_LIMIT, launcher)
            if rng.random() >= BURST_KILLS:
                await asyncio.sleep(rng.uniform(0.05, 0.7))
            else:
                done.burst += 1
        done.starting += part in down
        done.kills += 1
        await pipe.kill(part, aimed=part == "writer" and rng.random() < AIMED_KILLS)
        killed_at = time.monotonic()
        before = await pipe.progress(part)
        down[part] = (down[part][0], before) if part in down else (killed_at, before)
        await pipe.start(part)
    await wait_for("recovery from the last kill", recovered, RECOVER_LIMIT, launcher)
    return done


@pytest.mark.parametrize(
    ("victim", "store_kind", "broker_kind"), CASES, ids=["-".join(case) for case in CASES]
)
async def test_sigkill_at_random_moments_loses_nothing_and_applies_nothing_twice(
    victim: str, store_kind: str, broker_kind: str, tmp_path: Path
) -> None:
    require(store_kind)
    require(broker_kind)
    seed = int(os.environ.get("TIDINGS_CRASH_SEED") or random.randrange(2**32))
    print(f"\ncrash {victim} on {store_kind}+{broker_kind}: TIDINGS_CRASH_SEED={seed}")
    rng = random.Random(seed)
    pipe = Pipeline(store_kind, broker_kind, tmp_path, seed)
    started = time.monotonic()
    try:
        pipe.store = await open_store(pipe.store_url, codec=CODEC).open()
        pipe.broker = await open_broker(pipe.broker_url, codec=CODEC).open()
        for group in GROUPS:
            await pipe.broker.declare(pipe.topic, group)
        pipe.launcher = launcher = await Launcher.start(pipe.logdir)
        for part in ("consumer", "relay", "projection"):
            await pipe.start(part)
        await pipe.start("writer")
        for part in PARTS:  # every part has done some work before the first kill
            await wait_for(f"{part} to start", _moved(pipe, part), 60, launcher)

        done = await chaos(pipe, victim, rng)

        assert await launcher.stop("writer") == 0, launcher.tail("writer")
        pipe.acks.read()
        records = [record async for record in pipe.store.read_all()]
        head = await pipe.store.last_position()
        loaded = time.monotonic() - started

        async def drained() -> bool:
            effects = await pipe.distinct_effects()
            return (
                await pipe.progress("relay") >= head
                and await pipe.progress("projection") >= head
                and all(effects.get(group, 0) >= len(records) for group in GROUPS)
            )

        try:
            await wait_for("everything to catch up", drained, DRAIN_LIMIT, launcher)
            caught_up = True
        except AssertionError as exc:
            print(exc)
            caught_up = False
        stopped = {part: await launcher.stop(part) for part in ("relay", "projection", "consumer")}

        row, problems = await verify(pipe, records, head)
        problems += [
            f"{part} exited with {code}\n{launcher.tail(part)}"
            for part, code in stopped.items()
            if code != 0
        ]
        row.scenario = f"Crash: SIGKILL of {NAMES[victim]}"
        row.faults = done.describe(victim)
        if victim in ("writer", "all"):
            row.faults += f"; {pipe.aimed} writer kills aimed 0-3 ms into an append"
        row.recover_seconds = round(done.slowest, 2)
        row.seconds = round(time.monotonic() - started, 1)
        row.notes = (
            f"seed {seed}; load {loaded:.0f} s; {row.notes}; restarts fork a pre-imported "
            "parent (recovery = kill to the new process's first progress, lease included)"
        )
        report(row)
        assert caught_up, "the pipeline did not catch up (see above)"
        assert not problems, "\n".join(problems)
    finally:
        await pipe.close()


def _moved(pipe: Pipeline, part: str) -> Callable[[], Awaitable[bool]]:
    async def moved() -> bool:
        return await pipe.progress(part) > 0

    return moved


async def verify(
    pipe: Pipeline, records: list[RecordedEvent[Any]], head: int
) -> tuple[Row, list[str]]:
    """The scenario's row (lost, duplicated), and any other difference from a clean replay."""
    problems: list[str] = []
    lost = duplicated = 0
    stored_ids = {str(record.id) for record in records}

    # Appends: all or nothing, and every acknowledged one is stored.
    batches: dict[str, list[RecordedEvent[Any]]] = defaultdict(list)
    for record in records:
        assert isinstance(record.event, Moved)
        batches[record.event.batch].append(record)
    torn = unstored = 0
    for batch, members in batches.items():
        size = members[0].event.size
        indexes = sorted(member.event.index for member in members)
        versions = [member.version for member in members]
        if indexes != list(range(size)) or versions != list(range(versions[0], versions[0] + size)):
            problems.append(f"append {batch} is torn: indexes {indexes}, versions {versions}")
            lost += max(0, size - len(members))
            torn += 1
    for batch, (stream, first, last) in pipe.acks.acked.items():
        members = batches.get(batch, [])
        if not members:
            lost += last - first + 1
            unstored += 1
            problems.append(
                f"append {batch} was acknowledged ({stream} {first}-{last}), not stored"
            )
        elif (members[0].stream_id, members[0].version, members[-1].version) != (
            stream,
            first,
            last,
        ):
            stored = f"{members[0].stream_id} {members[0].version}-{members[-1].version}"
            problems.append(f"append {batch} acknowledged as {stream} {first}-{last}: {stored}")
    in_flight_stored = sum(1 for batch in pipe.interrupted if batch in batches)

    # The projection: checkpoint at the head, documents equal to a clean replay.
    expected = fold(records)
    store = pipe.store
    await ProjectionRunner(store, [LedgerReplay()], batch_size=500).catch_up()
    replayed = await ReadModel(store, LedgerReplay).all()
    if replayed != expected:
        problems.append("a fresh runner's replay differs from fold() (the test is wrong)")
    actual = await ReadModel(store, Ledger).all()
    same = actual == expected
    for key in sorted(expected.keys() | actual.keys()):
        want = (expected.get(key) or {}).get("count", 0)
        got = (actual.get(key) or {}).get("count", 0)
        if key != TOTALS:
            lost += max(0, want - got)
            duplicated += max(0, got - want)
        if actual.get(key) != expected.get(key):
            problems.append(f"projection {key}: {actual.get(key)} != replay {expected.get(key)}")
    checkpoint = await pipe.progress("projection")
    if checkpoint != head:
        problems.append(f"projection checkpoint {checkpoint} != head {head}")

    # The consumer groups: each stored event applied exactly once in each, in stream order.
    applied = await pipe._inbox_query(
        "select grp, event_id, count(*) from crash_effects group by grp, event_id"
    )
    last: dict[tuple[str, str], int] = {}
    disordered = 0
    for group, stream, version in await pipe._inbox_query(
        "select grp, stream, version from crash_effects order by seq"
    ):
        disordered += version < last.get((group, stream), 0)
        last[group, stream] = max(version, last.get((group, stream), 0))
    if disordered:
        problems.append(f"{disordered} effects applied after a later event of their stream")
    skips_path = pipe.folder / "skips.log"
    skipped = len(skips_path.read_text().splitlines()) if skips_path.exists() else 0
    counts: dict[str, Counter[str]] = {group: Counter() for group in GROUPS}
    for group, event_id, n in applied:
        counts[group][event_id] = int(n)
    outs = []
    for group in GROUPS:
        seen = counts[group]
        missing = stored_ids - seen.keys()
        phantoms = seen.keys() - stored_ids
        twice = sum(n - 1 for n in seen.values())
        lost += len(missing)
        duplicated += twice
        outs.append(len(seen.keys() & stored_ids))
        if missing:
            problems.append(f"group {group}: {len(missing)} stored events never applied")
        if phantoms:
            problems.append(f"group {group}: {len(phantoms)} effects of events never stored")
        if twice:
            problems.append(f"group {group}: {twice} effects applied twice")
    inbox = dict(
        await pipe._inbox_query("select consumer, count(*) from tidings_inbox group by consumer")
    )
    if {group: inbox.get(group, 0) for group in GROUPS} != {
        group: len(counts[group]) for group in GROUPS
    }:
        problems.append(f"inbox ids {inbox} != distinct effects")
    balances = {stream: (int(total), int(n)) for stream, total, n in
                await pipe._inbox_query("select stream, total, n from crash_balances")}  # fmt: skip
    want_balances = {
        key: (doc["sum"], doc["count"]) for key, doc in expected.items() if key != TOTALS
    }
    if balances != want_balances:
        problems.append(f"balances {balances} != replay {want_balances}")
    dead = await pipe.broker.dead_letters(pipe.topic)
    if dead:
        problems.append(f"{len(dead)} dead letters: {[d.error for d in dead[:3]]}")

    streams = len(expected) - 1
    row = Row(
        scenario="",
        backend=f"{'SQLite' if pipe.kind == 'sqlite' else 'PostgreSQL'} + "
        f"{BROKER_NAMES[pipe.broker_kind]}",
        load=f"{len(records):,} events in {len(batches):,} appends on {streams} streams, "
        f"~{RATE}/s from {WRITER_TASKS} writer tasks",
        faults="",
        events_in=len(records),
        events_out=min(outs),
        lost=lost,
        duplicated=duplicated,
        notes=(
            f"appends: {len(pipe.acks.acked):,} acknowledged ({unstored} not stored), "
            f"{len(pipe.interrupted)} in flight at a kill ({in_flight_stored} stored whole "
            f"though unacknowledged, the rest not at all), {torn} torn; the projection "
            f"{'equals' if same else 'DIFFERS FROM'} a clean replay; groups "
            f"{' and '.join(GROUPS)}: events out is the fewer distinct effects, "
            f"{disordered} out of stream order, {skipped:,} redeliveries turned away by the inbox"
        ),
    )
    return row, problems
