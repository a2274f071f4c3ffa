"""The SQLite schema: its tables (`MIGRATIONS`) and migrating to them, the statements the
writer and readers share, and how values are stored: times as microseconds since the Unix
epoch (`_from_micros`, `_to_micros`), driver errors mapped to tidings errors.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

# -- schema -------------------------------------------------------------------------------

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE tidings_events (
                position       INTEGER PRIMARY KEY,
                id             BLOB    NOT NULL UNIQUE,
                stream_id      TEXT    NOT NULL,
                version        INTEGER NOT NULL,
                type           TEXT    NOT NULL,
                schema_version INTEGER NOT NULL,
                recorded_at    INTEGER NOT NULL,  -- microseconds since the Unix epoch, UTC
                data           TEXT    NOT NULL,
                metadata       TEXT,
                UNIQUE (stream_id, version)
            )""",
            """CREATE TABLE tidings_streams (
                stream_id TEXT PRIMARY KEY,
                version   INTEGER NOT NULL
            ) WITHOUT ROWID""",
        ],
    ),
    (
        2,
        [
            """CREATE TABLE tidings_snapshots (
                stream_id      TEXT    NOT NULL,
                version        INTEGER NOT NULL,
                type           TEXT    NOT NULL,
                schema_version INTEGER NOT NULL,
                recorded_at    INTEGER NOT NULL,
                data           TEXT    NOT NULL,
                PRIMARY KEY (stream_id, version)
            ) WITHOUT ROWID""",
            """CREATE TABLE tidings_projections (
                name                TEXT    PRIMARY KEY,
                generation          INTEGER NOT NULL,
                position            INTEGER NOT NULL,
                updated_at          INTEGER NOT NULL,
                building_generation INTEGER,
                building_position   INTEGER NOT NULL DEFAULT 0
            ) WITHOUT ROWID""",
            """CREATE TABLE tidings_documents (
                projection TEXT    NOT NULL,
                generation INTEGER NOT NULL,
                key        TEXT    NOT NULL,
                doc        TEXT    NOT NULL,
                PRIMARY KEY (projection, generation, key)
            ) WITHOUT ROWID""",
        ],
    ),
    (
        3,
        [
            """CREATE TABLE tidings_leases (
                name       TEXT    PRIMARY KEY,
                owner      TEXT    NOT NULL,
                expires_at INTEGER NOT NULL  -- microseconds since the Unix epoch
            ) WITHOUT ROWID""",
        ],
    ),
    (
        4,
        [
            """CREATE TABLE tidings_subject_keys (
                subject TEXT PRIMARY KEY,
                key     BLOB NOT NULL  -- AES-256-GCM key of the subject's personal fields
            ) WITHOUT ROWID""",
        ],
    ),
    (
        5,
        [  # `tidings trace`: one correlation's events without a scan of the log
            """CREATE INDEX tidings_events_correlation
                ON tidings_events (json_extract(metadata, '$.correlation_id'), position)
                WHERE metadata IS NOT NULL""",
        ],
    ),
    (
        6,
        [  # dynamic consistency boundaries: an event's tags, and the tag and type indexes
            "ALTER TABLE tidings_events ADD COLUMN tags TEXT",  # joined by \x1f; NULL: none
            """CREATE TABLE tidings_tags (
                tag      TEXT    NOT NULL,
                position INTEGER NOT NULL,
                PRIMARY KEY (tag, position)
            ) WITHOUT ROWID""",
            "CREATE INDEX tidings_events_type ON tidings_events (type, position)",
        ],
    ),
]

_COLUMNS = (
    "position, id, stream_id, version, type, schema_version, recorded_at, data, metadata, tags"
)
_INSERT = (
    "INSERT INTO tidings_events (position, id, stream_id, version, type, schema_version, "
    "recorded_at, data, metadata, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_TAG = "INSERT INTO tidings_tags (tag, position) VALUES (?, ?)"
_UPSERT_STREAM = (
    "INSERT INTO tidings_streams (stream_id, version) VALUES (?, ?) "
    "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version"
)
_SYNCHRONOUS = ("off", "normal", "full", "extra")
_FLOAT_EXACT_BELOW = 2**32 * 1_000_000  # microseconds; the year 2106


def _from_micros(micros: int, _from_timestamp: Any = datetime.fromtimestamp) -> datetime:
    """Stored microseconds to an aware UTC datetime, exactly.

    Below 2**32 seconds a double holds micros / 1e6 to within 0.48 microseconds, so the
    one-call float path rounds back to the stored microsecond; later times take the exact path.
    """
    if 0 <= micros < _FLOAT_EXACT_BELOW:
        return _from_timestamp(micros / 1e6, UTC)  # type: ignore[no-any-return]
    return _EPOCH + timedelta(microseconds=micros)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _schema_version(conn: sqlite3.Connection) -> int | None:
    """The applied schema version, or None when the file holds no tidings tables."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tidings_schema'"
    ).fetchone()
    if not exists:
        return None
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM tidings_schema").fetchone()[0])


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply the missing migrations; safe when several processes start at once."""
    conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS tidings_schema (version INTEGER NOT NULL)")
        current = _schema_version(conn) or 0
        for version, statements in MIGRATIONS:
            if version > current:
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO tidings_schema (version) VALUES (?)", (version,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _to_micros(moment: datetime) -> int:
    delta = moment.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
