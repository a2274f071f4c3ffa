"""Scenario 6: projection catch-up on SQLite, tidings' `ProjectionRunner` against raw sqlite3.

One file is populated once with N `Deposited` events, each to the next of 1,000 account
streams in turn, so every batch of 1,000 events touches 1,000 different documents (a runner
that buffers a batch's writes saves no document reads or writes by it). Each timed run works on
a fresh copy of that file, with WAL and synchronous=FULL on both sides:

- tidings: a `Balances` projection (per event: get the stream's document, add the amount, put
  it back) caught up from position 0 to the head by `ProjectionRunner.catch_up()`, in batches
  of 1,000 (one transaction each, with the checkpoint).
- raw sqlite3: batches of `SELECT <all event columns> FROM tidings_events WHERE position > ?
  ORDER BY position LIMIT 1000`; per event `json.loads` of the data, a SELECT of the stream's
  document, the update, and an upsert of it; per batch an UPDATE of a checkpoint row and a
  COMMIT. Its documents and checkpoint tables have the shape of tidings' own
  (`(projection, generation, key) -> doc`; `name -> generation, position, updated_at`; both
  WITHOUT ROWID), under names of its own.

Both sides' documents are checked against the balances expected from the populated events.
Rates are events per second; the sides alternate which goes first from round to round.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from aggregates import Deposited, bench_store, drop, fresh
from sqlite_store import Measured
from tidings import Projection, ProjectionRunner, RecordedEvent, on, uuid7

Advance = Callable[[int], None]

STREAMS = 1000
BATCH = 1000
PROJECTION = "balances"
DEPOSITED = "bench.deposited"


class Balances(Projection, name=PROJECTION):
    """A stream's running balance, one document per stream."""

    @on(Deposited)
    def deposited(self, event: Deposited, record: RecordedEvent[Deposited]) -> None:
        doc = self.view.get(record.stream_id) or {"balance": 0}
        doc["balance"] += event.amount
        self.view.put(record.stream_id, doc)


def _amount(i: int) -> int:
    return 1 + (i * 7919) % 50_000


INSERT_EVENT = (
    "INSERT INTO tidings_events (position, id, stream_id, version, type, schema_version, "
    "recorded_at, data, metadata) VALUES (?, ?, ?, ?, ?, 1, ?, ?, NULL)"
)
INSERT_STREAM = "INSERT INTO tidings_streams (stream_id, version) VALUES (?, ?)"


async def _create(path: str) -> None:
    async with bench_store(path):  # opening migrates: tidings' own tables, indexes, schema row
        pass


def populate(directory: str, events: int, advance: Advance) -> tuple[str, dict[str, int]]:
    """The master file (copied for every run) and each stream's expected balance.

    The rows are those tidings would store for `Deposited(amount=...)` (checked: tidings
    decodes them all in every run), written straight into a file tidings created, because a
    round-robin over the streams, one event per append, would take far longer through the
    store than the catch-up itself.
    """
    path = fresh(directory, "s6-master.db")
    asyncio.run(_create(path))
    expected: dict[str, int] = defaultdict(int)
    versions: dict[str, int] = defaultdict(int)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = off")
        conn.execute("BEGIN IMMEDIATE")
        for lo in range(0, events, 10_000):
            rows = []
            now = time.time_ns() // 1000
            for i in range(lo, min(lo + 10_000, events)):
                stream = f"account-p{i % STREAMS}"
                versions[stream] += 1
                expected[stream] += _amount(i)
                data = json.dumps({"amount": _amount(i)}, separators=(",", ":"))
                rows.append((i + 1, uuid7().bytes, stream, versions[stream], DEPOSITED, now, data))
            conn.executemany(INSERT_EVENT, rows)
            advance(len(rows))
        conn.executemany(INSERT_STREAM, sorted(versions.items()))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return path, dict(expected)


def _copy(master: str, path: str) -> None:
    drop(path)
    shutil.copyfile(master, path)
    try:
        shutil.copyfile(master + "-wal", path + "-wal")
    except FileNotFoundError:  # closing normally checkpoints it away
        pass


# -- tidings -------------------------------------------------------------------------------


async def _tidings_catch_up(path: str, events: int, advance: Advance) -> tuple[float, int]:
    done = 0

    def progress(name: str, position: int, target: int) -> None:
        nonlocal done
        advance(position - done)
        done = position

    async with bench_store(path) as store:
        runner = ProjectionRunner(store, [Balances()], batch_size=BATCH)
        gc.collect()
        start = time.perf_counter()
        position = await runner.catch_up(progress=progress)
        elapsed = time.perf_counter() - start
    return events / elapsed, position


def _tidings_documents(path: str) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        generation = conn.execute(
            "SELECT max(generation) FROM tidings_documents WHERE projection = ?", (PROJECTION,)
        ).fetchone()[0]
        rows = conn.execute(
            "SELECT key, doc FROM tidings_documents WHERE projection = ? AND generation = ?",
            (PROJECTION, generation),
        ).fetchall()
    finally:
        conn.close()
    return {key: json.loads(doc)["balance"] for key, doc in rows}


# -- raw sqlite3 ---------------------------------------------------------------------------

RAW_TABLES = (
    """CREATE TABLE IF NOT EXISTS raw_documents (
        projection TEXT    NOT NULL,
        generation INTEGER NOT NULL,
        key        TEXT    NOT NULL,
        doc        TEXT    NOT NULL,
        PRIMARY KEY (projection, generation, key)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS raw_projections (
        name       TEXT    PRIMARY KEY,
        generation INTEGER NOT NULL,
        position   INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) WITHOUT ROWID""",
)
READ_BATCH = (
    "SELECT position, id, stream_id, version, type, schema_version, recorded_at, data, metadata "
    "FROM tidings_events WHERE position > ? ORDER BY position LIMIT ?"
)
GET_DOC = "SELECT doc FROM raw_documents WHERE projection = ? AND generation = ? AND key = ?"
PUT_DOC = (
    "INSERT INTO raw_documents (projection, generation, key, doc) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (projection, generation, key) DO UPDATE SET doc = excluded.doc"
)
SET_POSITION = "UPDATE raw_projections SET position = ?, updated_at = ? WHERE name = ?"


def _raw_connect(path: str) -> sqlite3.Connection:
    """tidings' pragmas: WAL, synchronous=FULL, a busy timeout; autocommit, explicit BEGIN."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA synchronous = full")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    assert str(mode).lower() == "wal", mode
    return conn


def _raw_catch_up(path: str, events: int, advance: Advance) -> tuple[float, int]:
    conn = _raw_connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for statement in RAW_TABLES:
            conn.execute(statement)
        conn.execute(
            "INSERT OR IGNORE INTO raw_projections (name, generation, position, updated_at) "
            "VALUES (?, 1, 0, ?)",
            (PROJECTION, time.time_ns() // 1000),
        )
        conn.execute("COMMIT")
        gc.collect()
        start = time.perf_counter()
        generation, position = conn.execute(
            "SELECT generation, position FROM raw_projections WHERE name = ?", (PROJECTION,)
        ).fetchone()
        loads, dumps, execute = json.loads, json.dumps, conn.execute
        while True:
            rows = execute(READ_BATCH, (position, BATCH)).fetchall()
            if not rows:
                break
            execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    if row[4] != DEPOSITED:
                        continue
                    data = loads(row[7])
                    key = row[2]
                    found = execute(GET_DOC, (PROJECTION, generation, key)).fetchone()
                    doc = loads(found[0]) if found else {"balance": 0}
                    doc["balance"] += data["amount"]
                    execute(PUT_DOC, (PROJECTION, generation, key, dumps(doc)))
                position = rows[-1][0]
                execute(SET_POSITION, (position, time.time_ns() // 1000, PROJECTION))
                execute("COMMIT")
            except BaseException:
                execute("ROLLBACK")
                raise
            advance(len(rows))
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    return events / elapsed, position


def _raw_documents(path: str) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT key, doc FROM raw_documents WHERE projection = ?", (PROJECTION,)
        ).fetchall()
    finally:
        conn.close()
    return {key: json.loads(doc)["balance"] for key, doc in rows}


# -- both ----------------------------------------------------------------------------------


def catch_up(
    directory: str,
    master: str,
    expected: dict[str, int],
    events: int,
    rounds: int,
    advance: Advance,
) -> Measured:
    """Scenario 6: `rounds` catch-ups per side over `events` events, each on a fresh copy."""
    measured = Measured(
        info={
            "events": events,
            "streams": STREAMS,
            "documents": len(expected),
            "batch_size": BATCH,
            "order": "event i goes to stream i % streams: a batch touches `streams` documents",
            "durability": "journal_mode=WAL, synchronous=FULL on both sides",
            "rounds": rounds,
        }
    )
    head = events  # positions are 1..events in a fresh file
    for round_ in range(rounds):
        sides: list[tuple[str, Callable[[str], tuple[float, int]], Callable[[str], Any]]] = [
            (
                "tidings",
                lambda p: asyncio.run(_tidings_catch_up(p, events, advance)),
                _tidings_documents,
            ),
            ("raw", lambda p: _raw_catch_up(p, events, advance), _raw_documents),
        ]
        for side, run, documents in sides if round_ % 2 == 0 else reversed(sides):
            path = fresh(directory, f"s6-{side}.db")
            _copy(master, path)
            rate, position = run(path)
            if position != head:
                raise SystemExit(f"scenario 6: {side} caught up to {position}, expected {head}")
            got = documents(path)
            if got != expected:
                wrong = sum(1 for key in expected if got.get(key) != expected[key])
                raise SystemExit(
                    f"scenario 6: {side} built {len(got)} documents, {wrong} of the "
                    f"{len(expected)} expected balances wrong"
                )
            getattr(measured, side).append(rate)
            drop(path)
    return measured
