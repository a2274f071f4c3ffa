"""The baseline: the same work done by hand with the standard library's sqlite3.

Same file format, same schema (the CREATE TABLE statements are tidings' own migrations, so the
indexes match), same pragmas (WAL, synchronous=FULL, busy_timeout), the same rows. Every
append checks the stream's version first, as an event store must.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence

from tidings.store.sqlite import MIGRATIONS
from workload import EVENT_TYPE, JSON_SEPARATORS, SCHEMA_VERSION, Item

COLUMNS = "position, id, stream_id, version, type, schema_version, recorded_at, data, metadata"
# The position is the rowid: SQLite picks the next one, as a hand-written store would.
INSERT = (
    "INSERT INTO tidings_events (id, stream_id, version, type, schema_version, recorded_at, "
    "data, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
UPSERT_STREAM = (
    "INSERT INTO tidings_streams (stream_id, version) VALUES (?, ?) "
    "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version"
)
SELECT_VERSION = "SELECT version FROM tidings_streams WHERE stream_id = ?"


class VersionClash(Exception):
    pass


def connect(path: str, *, create: bool = True, read_only: bool = False) -> sqlite3.Connection:
    """A connection with tidings' pragmas; `create` makes tidings' tables."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA synchronous = full")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    assert str(mode).lower() == "wal", mode
    if read_only:
        conn.execute("PRAGMA query_only = 1")
    if create:
        conn.execute("BEGIN IMMEDIATE")
        for _, statements in MIGRATIONS:
            for statement in statements:
                conn.execute(statement)
        conn.execute("COMMIT")
    return conn


def _now() -> int:
    return time.time_ns() // 1000


def append_one(conn: sqlite3.Connection, stream_id: str, expected: int, item: Item) -> int:
    """One event in its own durable transaction; returns the stream's new version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute(SELECT_VERSION, (stream_id,)).fetchone()
        actual = row[0] if row else 0
        if actual != expected:
            raise VersionClash(stream_id, expected, actual)
        version = actual + 1
        conn.execute(
            INSERT,
            (
                item.id,
                stream_id,
                version,
                EVENT_TYPE,
                SCHEMA_VERSION,
                _now(),
                json.dumps(item.data, separators=JSON_SEPARATORS),
                None,
            ),
        )
        conn.execute(UPSERT_STREAM, (stream_id, version))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version


def append_many(
    conn: sqlite3.Connection, stream_id: str, expected: int, items: Sequence[Item]
) -> int:
    """Several events of one stream in one transaction (`executemany`); the new version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute(SELECT_VERSION, (stream_id,)).fetchone()
        actual = row[0] if row else 0
        if actual != expected:
            raise VersionClash(stream_id, expected, actual)
        now = _now()
        dumps = json.dumps
        rows = [
            (
                item.id,
                stream_id,
                actual + 1 + i,
                EVENT_TYPE,
                SCHEMA_VERSION,
                now,
                dumps(item.data, separators=JSON_SEPARATORS),
                None,
            )
            for i, item in enumerate(items)
        ]
        conn.executemany(INSERT, rows)
        version = actual + len(rows)
        conn.execute(UPSERT_STREAM, (stream_id, version))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version


def read_all(
    conn: sqlite3.Connection,
    on_progress: Callable[[int], None],
    step: int,
    limit: int | None = None,
) -> int:
    """Every event in position order with its data decoded; returns how many."""
    sql = f"SELECT {COLUMNS} FROM tidings_events ORDER BY position"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    loads = json.loads
    count = 0
    mark = step
    for row in conn.execute(sql):
        loads(row[7])
        count += 1
        if count == mark:
            on_progress(step)
            mark += step
    return count


def check_same_rows(raw_path: str, tidings_path: str) -> None:
    """Fail loudly unless both files hold the same events (all but position and time)."""
    columns = "id, stream_id, version, type, schema_version, data, metadata"
    conn = sqlite3.connect(raw_path)
    try:
        conn.execute("ATTACH DATABASE ? AS other", (tidings_path,))
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM main.tidings_events), "
            "(SELECT count(*) FROM other.tidings_events)"
        ).fetchone()
        differ = conn.execute(
            f"SELECT count(*) FROM (SELECT {columns} FROM main.tidings_events "
            f"EXCEPT SELECT {columns} FROM other.tidings_events)"
        ).fetchone()[0]
        streams_differ = conn.execute(
            "SELECT count(*) FROM (SELECT * FROM main.tidings_streams "
            "EXCEPT SELECT * FROM other.tidings_streams)"
        ).fetchone()[0]
    finally:
        conn.close()
    if counts[0] != counts[1] or differ or streams_differ:
        raise SystemExit(
            f"the two sides stored different events: {counts[0]} raw rows, {counts[1]} tidings "
            f"rows, {differ} raw rows not in tidings, {streams_differ} stream versions differ"
        )
