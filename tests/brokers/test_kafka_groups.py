"""Members of a Kafka consumer group join and die mid-stream; behind an inbox no effect is lost
and none is doubled, and one key's effects keep their publish order.

A real Kafka-protocol broker (Tansu, or `$TIDINGS_TEST_KAFKA`) and real processes
(`kafka_member.py`), so the rebalances are Kafka's own: member A starts, B joins (a graceful
rebalance: A hands its partitions over), A is SIGKILLed while a handler runs (its partitions
move after the 6 s session timeout, and what it held unacked comes again from the last
commit), and C joins. Events are published throughout, keyed over 12 keys, so every change
of hands happens with records in flight. Every member writes its effect in the inbox's
transaction on one SQLite file; the table has no unique constraint, so a doubled delivery
the inbox failed to catch would show as a second row, a lost one as none, and a key handled
out of order as `seq` (commit order) disagreeing with `n` (publish order).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from tests.backends import kafka_url, require
from tests.brokers.kafka_member import CODEC, GROUP, Numbered
from tidings import Broker, open_broker, open_inbox

MEMBER = Path(__file__).with_name("kafka_member.py")
EVENTS = 300
KEYS = 12
PACE = 0.05  # seconds between publishes: the stream lasts ~15 s, past the kill
READY_BOUND = 20.0  # seconds for a member process to open the broker and the inbox
STEP_BOUND = 20.0  # seconds for each step's progress (a join costs Tansu ~3 s)
DRAIN_BOUND = 60.0  # seconds for every event to have its effect after the kill
STOP_BOUND = 15.0  # seconds a member gets to stop after SIGTERM, before SIGKILL


@dataclass
class Member:
    """A member process, and what it said it handled: (n, attempt) in order."""

    name: str
    process: asyncio.subprocess.Process
    errors: IO[bytes]  # its stderr, read when something fails
    handled: list[tuple[int, int]] = field(default_factory=list)
    handling: asyncio.Event = field(default_factory=asyncio.Event)  # set on each new line
    reader: asyncio.Task[None] | None = None
    killed: bool = False

    async def read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            word, *rest = line.decode().split()
            if word == "handling":
                self.handled.append((int(rest[0]), int(rest[1])))
                self.handling.set()

    def stderr(self) -> str:
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace")[-3000:]


async def start(name: str, url: str, topic: str, db: Path, folder: Path) -> Member:
    """Start a member process and wait until it says it is ready."""
    errors = (folder / f"{name}.stderr").open("w+b")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(MEMBER),
        url,
        topic,
        str(db),
        name,
        stdout=asyncio.subprocess.PIPE,
        stderr=errors,
    )
    member = Member(name, process, errors)
    assert process.stdout is not None
    try:
        async with asyncio.timeout(READY_BOUND):
            line = await process.stdout.readline()
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        await stop(member)
        pytest.fail(f"member {name} did not get ready (said {line!r}):\n{member.stderr()}")
    member.reader = asyncio.create_task(member.read())
    return member


async def stop(member: Member) -> None:
    """SIGTERM (a graceful stop), then SIGKILL after the bound; reap it either way."""
    with contextlib.suppress(ProcessLookupError):
        member.process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_BOUND):
            await member.process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            member.process.kill()
        await member.process.wait()
    if member.reader is not None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await member.reader  # the last lines, up to end of file
        member.reader.cancel()
    member.errors.close()


async def publish_all(broker: Broker, topic: str) -> None:
    """Publish EVENTS numbered events over KEYS keys, one every PACE seconds."""
    began = time.monotonic()
    for n in range(EVENTS):
        key = f"k{n % KEYS}"
        await broker.publish(topic, Numbered(n=n, key=key), key=key)
        await asyncio.sleep(max(0.0, began + (n + 1) * PACE - time.monotonic()))


def applied(db: sqlite3.Connection) -> Counter[str]:
    """Effects so far, per member."""
    return Counter(dict(db.execute("select member, count(*) from effects group by member")))


async def until(
    what: str,
    condition: Callable[[], bool],
    bound: float,
    members: list[Member],
    db: sqlite3.Connection,
) -> None:
    """Wait for `condition`, failing after `bound` seconds or when a member dies unasked."""
    deadline = time.monotonic() + bound
    while not condition():
        for member in members:
            if member.process.returncode is not None and not member.killed:
                pytest.fail(
                    f"member {member.name} exited ({member.process.returncode}) while waiting "
                    f"for {what}:\n{member.stderr()}"
                )
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {bound:.0f}s; effects so far {dict(applied(db))}")
        await asyncio.sleep(0.05)


def distinct(db: sqlite3.Connection) -> int:
    """How many events have an effect."""
    return int(db.execute("select count(distinct n) from effects").fetchone()[0])


@pytest.mark.timeout(180)
async def test_members_joining_and_dying_mid_stream_lose_and_double_no_effect(
    tmp_path: Path,
) -> None:
    require("kafka")
    url = kafka_url()
    topic = f"t-{uuid.uuid4().hex[:10]}"
    path = tmp_path / "inbox.db"
    async with open_inbox(f"sqlite:///{path}"):
        pass  # its table exists (and the file is in WAL mode) before any member opens it
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("pragma busy_timeout=5000")
    db.execute(
        "create table effects (seq integer primary key autoincrement, n int, key text, member text)"
    )
    members: list[Member] = []
    began = time.monotonic()
    async with open_broker(url, codec=CODEC) as broker:
        await broker.declare(topic, GROUP)  # the group gets everything published from now on
        publisher = asyncio.create_task(publish_all(broker, topic))
        try:
            a = await start("A", url, topic, path, tmp_path)
            members.append(a)
            await until("effects of A", lambda: applied(db)["A"] >= 30, STEP_BOUND, members, db)

            members.append(await start("B", url, topic, path, tmp_path))  # a join: rebalance
            await until("effects of B", lambda: applied(db)["B"] >= 10, STEP_BOUND, members, db)

            # A dies inside a handler: its effect rolls back, the event is unacked.
            a.handling.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STEP_BOUND):
                    await a.handling.wait()
            a.killed = True
            a.process.kill()
            await a.process.wait()
            killed_at = time.monotonic() - began
            in_hand = a.handled[-1][0] if a.handling.is_set() else None
            at_kill = applied(db)

            members.append(await start("C", url, topic, path, tmp_path))  # another join
            await until(
                "effect for every event",
                lambda: distinct(db) >= EVENTS,
                DRAIN_BOUND,
                members,
                db,
            )
            took = time.monotonic() - began
            await publisher  # done long since: everything it published has an effect
            await asyncio.sleep(1.0)  # a late duplicate would land now
        finally:
            publisher.cancel()
            await asyncio.gather(*(stop(member) for member in members))

    rows = db.execute("select seq, n, key, member from effects order by seq").fetchall()
    db.close()
    effects = Counter(n for _, n, _, _ in rows)
    per_member = Counter(member for *_, member in rows)
    ran_in: dict[int, set[str]] = defaultdict(set)  # n -> the members whose handler ran it
    attempts: dict[int, int] = {}  # n -> the highest attempt any member saw
    for member in members:
        for n, attempt in member.handled:
            ran_in[n].add(member.name)
            attempts[n] = max(attempts.get(n, 0), attempt)
    in_two = sorted(n for n, names in ran_in.items() if len(names) > 1)
    again = sorted(n for n, attempt in attempts.items() if attempt > 1)
    exits = {m.name: m.process.returncode for m in members}
    by = next((member for _, n, _, member in rows if n == in_hand), None)
    print(
        f"\nkafka groups: {len(rows)} effects for {EVENTS} events in {took:.1f}s; per member "
        f"{dict(sorted(per_member.items()))}; A killed at {killed_at:.1f}s holding "
        f"{in_hand} (applied by {by}) after {at_kill['A']} effects "
        f"({sum(at_kill.values())} in all); handler ran in two members for {in_two}; "
        f"attempt > 1 for {again}; exits {exits}"
    )

    missing = sorted(set(range(EVENTS)) - effects.keys())
    doubled = {n: count for n, count in effects.items() if count > 1}
    assert not missing, f"lost: no effect for {missing}"
    assert not doubled, f"doubled: {doubled}"
    assert all(key == f"k{n % KEYS}" for _, n, key, _ in rows)
    order: dict[str, list[int]] = defaultdict(list)
    for _, n, key, _ in rows:
        order[key].append(n)
    disordered = {key: ns for key, ns in order.items() if ns != sorted(ns)}
    assert not disordered, f"a key's effects out of publish order: {disordered}"
    assert len(per_member) > 1, f"one member applied everything: {dict(per_member)}"
    # The test tested something: an event changed hands, or A died mid-stream.
    assert in_two or 0 < at_kill["A"] < sum(at_kill.values()) < EVENTS, (
        f"nothing changed hands: A died after {at_kill['A']} of {sum(at_kill.values())}"
    )
