"""Disk full on SQLite: appends fail cleanly, nothing committed is harmed, writing resumes
when space returns.

The store lives on a small filesystem the test mounts (a tmpfs, else an ext4 image on a loop
device; the test skips, saying why, where the machine allows neither). Filler files take
part of it. Writers append until the disk is full and go on a while longer, with appends too
big to fit mixed among small ones, since SQLite undoes a whole transaction when it runs out of
space in the middle of it and a group commit shares one transaction among many appends. Then:

- every refused append raised `StoreError` saying the disk is full, and left nothing;
- every acknowledged event reads back intact, each stream's versions run 1..n, and
  `PRAGMA integrity_check` says ok;
- a live subscriber and a projection (read model + checkpoint in the store) running all along
  neither crashed nor skipped: the subscriber saw every event once, in order, and the
  projection counts each stream's events exactly once;
- once a filler file is deleted, appends resume on the same open store (and the refused ones
  can be retried), then again after reopening it.

Short: two fill-and-free cycles on 32 MB; long: ten on 168 MB.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tidings
from tests.events import Note
from tests.reliability.harness import Row, reliability, report, scale, stopwatch
from tidings import ANY, Projection, ProjectionRunner, RecordedEvent, StoreError, TidingsError, on

pytestmark = [reliability, pytest.mark.slow]

FILLERS = scale(24, 160)  # files of 1 MB taking most of the filesystem, deleted to free space
SIZE_MB = FILLERS + 8  # the filesystem the store lives on: 8 MB left for it at first
CYCLES = scale(2, 10)  # fill it, free some space, write again
WRITERS = 8
STREAMS = [f"disk-{n}" for n in range(5)]
AFTER_FULL = scale(40, 120)  # appends tried once the disk is full, before space returns
BIG = 6  # events of ~480 KB: an append bigger than SQLite's page cache (2 MB), so it spills
SANDWICHES = scale(4, 10)  # groups of small appends around a big one, once the disk is full


# -- a small filesystem ---------------------------------------------------------------------


def _run(*command: str) -> str:
    """Run `command`; "" when it worked, else what it said."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{command[0]}: {exc}"
    if done.returncode == 0:
        return ""
    return f"`{' '.join(command)}` exited {done.returncode}: {done.stderr.strip() or done.stdout}"


def _unmount(point: str) -> None:
    if _run("umount", point):
        _run("umount", "-l", point)  # busy: detach now, free when the last file closes


@contextmanager
def small_filesystem(size_mb: int) -> Iterator[tuple[Path, str]]:
    """A fresh filesystem of `size_mb` MB mounted on a temporary directory, and its kind.

    A tmpfs if the machine lets us mount one, else an ext4 image on a loop device (no blocks
    reserved for root, who would otherwise write past "full"). Neither possible: skip, saying
    why. The machine, not a service, is missing, so `TIDINGS_REQUIRE_SERVICES=1` does not
    make this a failure. Unmounted afterwards, whatever happened.
    """
    if sys.platform != "linux" or os.geteuid() != 0:
        reason = f"mounting a small filesystem needs root on Linux (platform {sys.platform})"
        print(f"disk full: skipped: {reason}")
        pytest.skip(reason)
    point = tempfile.mkdtemp(prefix="tidings-diskfull-")
    image = ""
    kind = ""
    problems = []
    why = _run("mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", point)
    if not why:
        kind = "tmpfs"
    else:
        problems.append(f"tmpfs: {why}")
        handle, image = tempfile.mkstemp(prefix="tidings-diskfull-", suffix=".img")
        os.close(handle)
        os.truncate(image, size_mb * 1024 * 1024)
        why = _run("mkfs.ext4", "-q", "-F", "-m", "0", image) or _run(
            "mount", "-o", "loop", image, point
        )
        if not why:
            kind = "ext4 on a loop device"
        else:
            problems.append(f"loop-mounted ext4: {why}")
    try:
        if not kind:
            reason = "cannot mount a small filesystem here: " + "; ".join(problems)
            print(f"disk full: skipped: {reason}")
            pytest.skip(reason)
        yield Path(point), kind
    finally:
        if kind:
            _unmount(point)
        shutil.rmtree(point, ignore_errors=True)
        if image:
            os.remove(image)


def fill(path: Path, megabytes: int) -> None:
    """A file of real blocks (not sparse), to delete when space should come back."""
    with open(path, "wb") as out:
        for _ in range(megabytes):
            out.write(os.urandom(1024 * 1024))
        out.flush()
        os.fsync(out.fileno())


# -- the followers ------------------------------------------------------------------------


class Tally(Projection, name="disk_full_tally"):
    """Per stream: how many events were applied, the last version, and any break in the run
    of versions (a skipped or repeated event)."""

    @on(Note)
    def noted(self, event: Note, record: RecordedEvent[Note]) -> None:
        doc = self.view.get(record.stream_id, {"count": 0, "version": 0, "breaks": 0})
        self.view.put(
            record.stream_id,
            {
                "count": doc["count"] + 1,
                "version": record.version,
                "breaks": doc["breaks"] + (record.version != doc["version"] + 1),
            },
        )


@dataclass
class Book:
    """What the writers were told."""

    acked: dict[str, tuple[str, str]] = field(default_factory=dict)  # id: (stream, text)
    results: list[tuple[str, list[str], int, int]] = field(default_factory=list)
    # key: events (the texts of big appends are dropped: a long run refuses gigabytes of them,
    # and only small ones are retried as they were)
    refused: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    refused_stream: dict[str, str] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    other_errors: list[str] = field(default_factory=list)
    attempts: int = 0

    async def append(self, store: Any, stream: str, events: list[tuple[str, str]]) -> bool:
        """Append `events` ((id, text) pairs) with ANY and write down the outcome."""
        self.attempts += 1
        notes = [Note(text=text).with_id(uuid.UUID(hex=i)) for i, text in events]
        try:
            result = await store.append(stream, notes, expected_version=ANY)
        except StoreError as exc:
            self.errors[str(exc).split(": ", 1)[-1]] += 1
            if "disk is full" not in str(exc):
                self.other_errors.append(f"StoreError not saying the disk is full: {exc}")
            self.refused[events[0][0]] = _kept(events)
            self.refused_stream[events[0][0]] = stream
            return False
        except Exception as exc:  # not a clean tidings error: a finding
            self.other_errors.append(f"{type(exc).__name__}: {exc}")
            self.refused[events[0][0]] = _kept(events)
            self.refused_stream[events[0][0]] = stream
            return False
        self.refused.pop(events[0][0], None)
        for event_id, text in events:
            self.acked[event_id] = (stream, text)
        self.results.append((stream, [i for i, _ in events], result.version, result.position))
        return True


def _kept(events: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What the book keeps of a refused append: all of a small one, the ids of a big one."""
    if sum(len(text) for _, text in events) < 1_000_000:
        return events
    return [(event_id, "") for event_id, _ in events]


def events_of(rnd: random.Random, sizes: tuple[int, int], count: int) -> list[tuple[str, str]]:
    return [
        (uuid.uuid4().hex, f"{k}:" + rnd.choice("abcdefgh") * rnd.randint(*sizes))
        for k in range(count)
    ]


async def fill_up(store: Any, book: Book, rnd: random.Random, first: bool) -> tuple[int, int]:
    """Append from `WRITERS` tasks until the disk is full, then `AFTER_FULL` more attempts,
    small and too big mixed, then `sandwich`es; after the first time, `sandwich`es first too,
    while there is some space, less than a big append takes. (Appends acked, refused.)"""
    full = asyncio.Event()
    tried_after = 0
    acked = refused = 0
    for _ in range(0 if first else SANDWICHES):
        ok, failed = await sandwich(store, book, rnd)
        acked, refused = acked + ok, refused + failed

    async def writer(name: int) -> None:
        nonlocal tried_after, acked, refused
        while tried_after < AFTER_FULL:
            stream = rnd.choice(STREAMS)
            if full.is_set() and rnd.random() < 0.15:
                events = events_of(rnd, (470_000, 490_000), BIG)  # ~6 MB: spills and fails
            else:
                events = events_of(rnd, (200, 16_000), rnd.randint(1, 3))
            if full.is_set():
                tried_after += 1
            if await book.append(store, stream, events):
                acked += 1
            else:
                refused += 1
                full.set()

    await asyncio.gather(*(writer(n) for n in range(WRITERS)))
    for _ in range(SANDWICHES):
        ok, failed = await sandwich(store, book, rnd)
        acked, refused = acked + ok, refused + failed
    return acked, refused


async def sandwich(store: Any, book: Book, rnd: random.Random) -> tuple[int, int]:
    """Small appends queued around one too big to fit, so that they share its group commit:
    the big one runs out of space mid-transaction, and SQLite undoes the whole transaction
    (the small ones must then fail with it, not run on outside it)."""
    stream, other = rnd.sample(STREAMS, 2)
    batch = [(stream, events_of(rnd, (100, 400), 1)) for _ in range(3)]
    batch.append((other, events_of(rnd, (470_000, 490_000), BIG)))
    batch += [(stream, events_of(rnd, (100, 400), 1)) for _ in range(3)]
    outcomes = await asyncio.gather(*(book.append(store, s, e) for s, e in batch))
    return sum(outcomes), len(outcomes) - sum(outcomes)


@dataclass
class Check:
    lost: int = 0
    duplicated: int = 0
    read_back: int = 0
    problems: list[str] = field(default_factory=list)


async def check_store(store: Any, book: Book, path: Path) -> Check:
    """Read everything back and compare it with what the writers were told."""
    check = Check()
    copies: Counter[str] = Counter()
    versions: dict[str, list[int]] = {}
    positions: list[int] = []
    async for record in store.read_all():
        key = record.id.hex
        copies[key] += 1
        positions.append(record.position)
        versions.setdefault(record.stream_id, []).append(record.version)
        if key in book.acked and book.acked[key] != (record.stream_id, record.event.text):
            check.problems.append(f"event {key} reads back changed")
    check.read_back = sum(1 for key in book.acked if key in copies)
    check.lost = len(book.acked) - check.read_back
    refused = {i for events in book.refused.values() for i, _ in events}
    left = refused & set(copies)
    if left:
        check.problems.append(f"{len(left)} events of refused appends are stored")
    unknown = set(copies) - set(book.acked) - refused
    if unknown:
        check.problems.append(f"{len(unknown)} stored events nobody appended")
    check.duplicated = sum(n - 1 for n in copies.values()) + len(left)
    if positions != sorted(set(positions)):
        check.problems.append("read_all positions are not strictly increasing")
    for stream, seen in versions.items():
        if seen != list(range(1, len(seen) + 1)):
            check.problems.append(f"{stream}: versions {seen[:10]}... have a gap or a repeat")
        if await store.stream_version(stream) != len(seen):
            check.problems.append(f"{stream}: stream_version is not {len(seen)}")
        by_stream = [r.version async for r in store.read_stream(stream)]
        if by_stream != seen:
            check.problems.append(f"{stream}: read_stream disagrees with read_all")
    for stream, ids, version, position in book.results:
        first = version - len(ids) + 1
        got = [
            (r.id.hex, r.version, r.position)
            async for r in store.read_stream(stream, first, limit=len(ids))
        ]
        want = [(i, first + k) for k, i in enumerate(ids)]
        if [g[:2] for g in got] != want or (got and got[-1][2] != position):
            check.problems.append(f"append acknowledged at {stream}@{version} reads back {got}")
    verdict = integrity(path)
    if verdict != "ok":
        check.problems.append(f"integrity_check: {verdict}")
    return check


def wal_megabytes(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size // (1024 * 1024)


def integrity(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check").fetchall())
    finally:
        conn.close()


async def follow(store: Any, seen: list[tuple[int, str]]) -> None:
    async for record in store.subscribe():
        seen.append((record.position, record.id.hex))


async def caught_up(seen: list[tuple[int, str]], head: int, timeout: float = 30.0) -> None:
    """Wait (bounded) for the subscriber to reach `head`; the caller compares what it saw."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (seen[-1][0] if seen else 0) >= head:
            return
        await asyncio.sleep(0.01)


async def log_of(store: Any) -> list[tuple[int, str]]:
    return [(r.position, r.id.hex) async for r in store.read_all()]


# -- the scenario ---------------------------------------------------------------------------


def test_disk_full_then_space_returns() -> None:
    with stopwatch() as took:
        with small_filesystem(8) as (mount, kind):
            groups, group_problems = asyncio.run(mid_transaction(mount))
        with small_filesystem(SIZE_MB) as (mount, kind):
            for n in range(FILLERS):
                fill(mount / f"filler-{n}", 1)
            outcome = asyncio.run(scenario(mount))
    book, check, recovered, subscriber_problems, projection_problems, freed = outcome
    problems = (
        group_problems + check.problems + subscriber_problems + projection_problems
    ) + book.other_errors
    refused_total = sum(book.errors.values()) + len(book.other_errors)
    report(
        Row(
            scenario="Disk full under SQLite, then space returns",
            backend=f"SQLite (WAL) on a {SIZE_MB} MB {kind}",
            load=(
                f"{WRITERS} writers, {len(STREAMS)} streams, appends of 1-3 events of "
                f"0.2-16 KB and of {BIG} x 480 KB, until full; {book.attempts} appends tried"
            ),
            faults=(
                f"disk full {len(freed)}x ({refused_total} appends refused), then "
                f"{', '.join(map(str, freed))} MB freed"
            ),
            events_in=len(book.acked),
            events_out=check.read_back,
            lost=check.lost,
            duplicated=check.duplicated,
            recover_seconds=round(max(recovered), 2) if recovered else None,
            notes=(
                "refusals: "
                + ", ".join(f"{n} x StoreError '{m}'" for m, n in book.errors.items())
                + "; integrity_check ok, subscriber and projection complete, resumed on the "
                "same store and after reopening; space freed each time: the WAL file's size "
                "+ 1 MB (SQLite must copy the WAL into the database file before reusing it); "
                f"and on a fresh 8 MB {kind}, {groups} group commits holding a 12 MB append "
                "failed whole, leaving nothing"
                + (f"; PROBLEMS: {len(problems)}" if problems else "")
            ),
            seconds=round(took[0], 1),
        )
    )
    assert not problems, problems[:20]


async def scenario(
    mount: Path,
) -> tuple[Book, Check, list[float], list[str], list[str], int]:
    path = mount / "events.db"
    url = f"sqlite:///{path}"
    rnd = random.Random(20240611)
    book = Book()
    recovered: list[float] = []
    seen: list[tuple[int, str]] = []
    subscriber_problems: list[str] = []
    projection_problems: list[str] = []
    store_problems: list[str] = []
    freed: list[int] = []
    fillers = [mount / f"filler-{n}" for n in range(FILLERS)]
    async with tidings.open_store(url) as store:
        subscriber = asyncio.create_task(follow(store, seen))
        async with ProjectionRunner(store, [Tally()], batch_size=50) as runner:
            for n in range(CYCLES):
                acked, refused = await fill_up(store, book, rnd, first=n == 0)
                assert refused, f"cycle {n}: the disk never filled ({acked} appends fit)"
                # While the disk is full: reads work and nothing committed is harmed.
                check = await check_store(store, book, path)
                store_problems += [f"cycle {n}, while full: {p}" for p in check.problems]
                head = await store.last_position()
                await caught_up(seen, head)
                if seen != await log_of(store):
                    subscriber_problems.append(f"cycle {n}, full: the subscriber missed events")
                if subscriber.done():
                    subscriber_problems.append(f"the subscriber stopped: {subscriber!r}")
                statuses = await _status(runner)
                if statuses:
                    projection_problems.append(f"cycle {n}: the projection stopped: {statuses}")

                # Space comes back: the same open store writes again, at once. SQLite copies
                # the WAL into the database file before it reuses the WAL, so as much space
                # as the WAL holds must come back; less, and the disk fills again at once.
                wal = wal_megabytes(path) + 1
                assert len(fillers) >= wal, f"cycle {n}: {wal} MB to free, {len(fillers)} left"
                for _ in range(wal):
                    os.remove(fillers.pop())
                freed.append(wal)
                started = time.monotonic()
                while not await book.append(store, STREAMS[0], events_of(rnd, (100, 200), 1)):
                    if time.monotonic() - started > 30:
                        raise AssertionError("appends did not resume within 30 s of space")
                    await asyncio.sleep(0.05)
                appended = time.monotonic() - started
                retried = list(book.refused.items())[:20]  # the refused ones, retried as is
                for key, events in retried:
                    if len(events) < BIG:  # the big ones would not fit in what was freed
                        await book.append(store, book.refused_stream[key], events)
                head = await store.last_position()
                try:
                    await runner.wait_for(head, timeout=30)
                except TimeoutError as exc:
                    projection_problems.append(f"cycle {n}: {exc}")
                recovered.append(max(appended, time.monotonic() - started))
            head = await store.last_position()
            try:
                await runner.wait_for(head, timeout=30)
            except TimeoutError as exc:
                projection_problems.append(f"at the end: {exc}")
            tally = {s: await runner.read_model(Tally).get(s) for s in STREAMS}
        await caught_up(seen, head)
        log = await log_of(store)
        if seen != log:
            missing = len(set(log) - set(seen))
            subscriber_problems.append(
                f"the subscriber saw {len(seen)} events, the log holds {len(log)} "
                f"({missing} missing, {len(seen) - len(set(seen))} twice)"
            )
        subscriber.cancel()
        try:
            await subscriber
        except (asyncio.CancelledError, TidingsError) as exc:
            if not isinstance(exc, asyncio.CancelledError):
                subscriber_problems.append(f"the subscriber failed: {exc!r}")
        for stream in STREAMS:
            version = await store.stream_version(stream)
            doc = tally[stream] or {"count": 0, "version": 0, "breaks": 0}
            if (doc["count"], doc["version"], doc["breaks"]) != (version, version, 0):
                projection_problems.append(f"{stream} at version {version}, projection: {doc}")

    # Reopened: everything still there, and it writes.
    async with tidings.open_store(url) as store:
        if not await book.append(store, STREAMS[1], events_of(rnd, (100, 200), 2)):
            projection_problems.append("no append after reopening")
        check = await check_store(store, book, path)
    check.problems += store_problems
    return book, check, recovered, subscriber_problems, projection_problems, freed


async def mid_transaction(mount: Path) -> tuple[int, list[str]]:
    """Small appends committed in one group with an append bigger than the disk has room
    for, on a store with room to spare: SQLite runs out of space in the middle of the big
    one and rolls the whole transaction back. Every append of the group must fail with the
    disk-full error and leave nothing; none may run on in a transaction of its own."""
    path = mount / "group.db"
    rnd = random.Random(7)
    book = Book()
    groups = 0
    async with tidings.open_store(f"sqlite:///{path}") as store:
        await book.append(store, "group-small", events_of(rnd, (10, 20), 1))
        for _ in range(4):
            batch = [("group-small", events_of(rnd, (10, 20), 1)) for _ in range(3)]
            batch.append(("group-big", events_of(rnd, (880_000, 900_000), 14)))  # 12 MB
            batch += [("group-small", events_of(rnd, (10, 20), 1)) for _ in range(3)]
            outcomes = await asyncio.gather(*(book.append(store, s, e) for s, e in batch))
            groups += not outcomes[3]
        check = await check_store(store, book, path)
    problems = [f"group commit: {p}" for p in check.problems + book.other_errors]
    if check.lost or check.duplicated:
        problems.append(f"group commit: {check.lost} lost, {check.duplicated} duplicated")
    if not groups:
        problems.append("group commit: the 12 MB append never ran out of space")
    return groups, problems


async def _status(runner: ProjectionRunner) -> list[str]:
    return [s.error for s in await runner.status() if s.error]
