"""Snapshots, projection checkpoints and rebuilds, and read-model documents.

Every write here is a job of the writer thread (`_write`), so a projection's documents and
its checkpoint commit in one transaction; reads go to the reader connections.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from tidings.core.errors import StoreError
from tidings.core.personal import new_key
from tidings.store.base import (
    ProjectionState,
    Snapshot,
    advance_projection,
    begin_rebuild,
    swap_rebuild,
)
from tidings.store.checkpoints import (
    ProjectionCommit,
    documents_owner,
    segment_prefix,
    segment_rows,
)
from tidings.store.sqlite.connection import SQLiteCore
from tidings.store.sqlite.schema import _from_micros, _to_micros

_PROJECTION = (
    "name, generation, position, updated_at, building_generation, building_position "
    "FROM tidings_projections"
)
_UPSERT_DOCUMENT = (
    "INSERT INTO tidings_documents (projection, generation, key, doc) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (projection, generation, key) DO UPDATE SET doc = excluded.doc"
)
_END = 2**62


class SQLiteProjections(SQLiteCore):
    """Snapshots, projection checkpoints and rebuilds, and documents."""

    async def _save_snapshot(
        self, stream_id: str, version: int, type: str, schema_version: int, data: str
    ) -> None:
        def work(conn: sqlite3.Connection, now: int) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO tidings_snapshots (stream_id, version, type, "
                "schema_version, recorded_at, data) VALUES (?, ?, ?, ?, ?, ?)",
                (stream_id, version, type, schema_version, now, data),
            )

        await self._write(work)

    async def _read_snapshot(
        self, stream_id: str, max_version: int | None, recorded_until: datetime | None
    ) -> Snapshot | None:
        top = _END if max_version is None else max_version
        until = _END if recorded_until is None else _to_micros(recorded_until)

        def work(conn: sqlite3.Connection) -> Snapshot | None:
            row = conn.execute(
                "SELECT stream_id, version, type, schema_version, recorded_at, data "
                "FROM tidings_snapshots WHERE stream_id = ? AND version <= ? "
                "AND recorded_at <= ? ORDER BY version DESC LIMIT 1",
                (stream_id, top, until),
            ).fetchone()
            if row is None:
                return None
            return Snapshot(row[0], row[1], row[2], row[3], _from_micros(row[4]), row[5])

        return self._inline(work)  # one primary-key lookup

    # -- projections -----------------------------------------------------------------------

    async def _projection_states(self, name: str | None) -> list[ProjectionState]:
        def work(conn: sqlite3.Connection) -> list[ProjectionState]:
            if name is None:
                rows = conn.execute(f"SELECT {_PROJECTION} ORDER BY name").fetchall()
            else:
                rows = conn.execute(f"SELECT {_PROJECTION} WHERE name = ?", (name,)).fetchall()
            return [_projection_state(row) for row in rows]

        return await self._run(work)

    async def _commit_projection(self, commit: ProjectionCommit) -> None:
        name, generation, writes = commit.name, commit.generation, commit.writes
        owner = commit.documents or name
        upserts = [(owner, generation, k, doc) for k, doc in writes.items() if doc is not None]
        deletes = [(owner, generation, k) for k, doc in writes.items() if doc is None]

        def work(conn: sqlite3.Connection, now: int) -> None:
            current = _read_projection(conn, name)
            state = advance_projection(current, commit, _from_micros(now))
            if commit.documents is not None:
                main = documents_owner(_read_projection(conn, owner), commit, _from_micros(now))
                if main is not None:
                    _save_projection(conn, main, now)
            if upserts:
                conn.executemany(_UPSERT_DOCUMENT, upserts)
            if deletes:
                conn.executemany(
                    "DELETE FROM tidings_documents WHERE projection = ? AND generation = ? "
                    "AND key = ?",
                    deletes,
                )
            _save_projection(conn, state, now)

        await self._write(work)

    async def _start_rebuild(self, name: str) -> ProjectionState:
        def work(conn: sqlite3.Connection, now: int) -> ProjectionState:
            state = begin_rebuild(_read_projection(conn, name), name, _from_micros(now))
            conn.execute(  # what an aborted rebuild left behind
                "DELETE FROM tidings_documents WHERE projection = ? AND generation <> ?",
                (name, state.generation),
            )
            _save_projection(conn, state, now)
            return state

        return await self._write(work)

    async def _finish_rebuild(self, name: str, generation: int, segments: int) -> None:
        def work(conn: sqlite3.Connection, now: int) -> None:
            current = _read_projection(conn, name)
            state = swap_rebuild(current, name, generation, _from_micros(now))
            conn.execute(
                "DELETE FROM tidings_documents WHERE projection = ? AND generation <> ?",
                (name, generation),
            )
            _save_projection(conn, state, now)
            prefix = segment_prefix(name)
            conn.execute(
                "DELETE FROM tidings_projections WHERE substr(name, 1, ?) = ?",
                (len(prefix), prefix),
            )
            for row in segment_rows(name, segments, generation, state.position, _from_micros(now)):
                _save_projection(conn, row, now)

        await self._write(work)

    async def _get_documents(
        self, name: str, generation: int | None, keys: Sequence[str]
    ) -> dict[str, str]:
        def work(conn: sqlite3.Connection) -> dict[str, str]:
            gen = _generation_of(conn, name) if generation is None else generation
            found: dict[str, str] = {}
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ", ".join("?" * len(chunk))
                found.update(
                    conn.execute(
                        "SELECT key, doc FROM tidings_documents WHERE projection = ? "
                        f"AND generation = ? AND key IN ({marks})",
                        (name, gen, *chunk),
                    ).fetchall()
                )
            return found

        return await self._run(work)

    async def _documents_batch(
        self, name: str, generation: int | None, after: str, limit: int
    ) -> list[tuple[str, str]]:
        def work(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            gen = _generation_of(conn, name) if generation is None else generation
            rows = conn.execute(
                "SELECT key, doc FROM tidings_documents WHERE projection = ? AND generation = ? "
                "AND key > ? ORDER BY key LIMIT ?",
                (name, gen, after, limit),
            ).fetchall()
            return [(key, doc) for key, doc in rows]

        return await self._run(work)

    def _document_reader(self, name: str, generation: int) -> Callable[[str], str | None]:
        sql = (
            "SELECT doc FROM tidings_documents WHERE projection = ? AND generation = ? AND key = ?"
        )

        # This thread's read-only connection, taken once: the reader is called per event.
        execute = self._inline(lambda conn: conn.execute)
        path = self.path

        def read(key: str) -> str | None:
            try:
                row = execute(sql, (name, generation, key)).fetchone()
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"sqlite ({path}): {exc}") from exc
            return None if row is None else str(row[0])

        return read


class SQLitePersonalData(SQLiteCore):
    """The keys of personal data, and forgetting a subject."""

    async def _subject_keys(self, subjects: set[str], create: bool) -> dict[str, bytes]:
        wanted = sorted(subjects)

        def select(conn: sqlite3.Connection) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                found.update(
                    conn.execute(
                        f"SELECT subject, key FROM tidings_subject_keys WHERE subject IN ({marks})",
                        chunk,
                    ).fetchall()
                )
            return found

        if not create:
            return self._inline(select)

        def make(conn: sqlite3.Connection, now: int) -> dict[str, bytes]:
            conn.executemany(
                "INSERT OR IGNORE INTO tidings_subject_keys (subject, key) VALUES (?, ?)",
                [(subject, new_key()) for subject in wanted],
            )
            return select(conn)

        return await self._write(make)

    async def _forget(self, subject: str) -> None:
        def work(conn: sqlite3.Connection, now: int) -> None:
            conn.execute("DELETE FROM tidings_subject_keys WHERE subject = ?", (subject,))
            conn.execute("DELETE FROM tidings_snapshots")

        await self._write(work)
        # The WAL still holds the pages as they were: fold it into the file and empty it.
        await asyncio.get_running_loop().run_in_executor(None, self._truncate_wal)

    def _truncate_wal(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout)}")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()


def _projection_state(row: Any) -> ProjectionState:
    return ProjectionState(row[0], row[1], row[2], _from_micros(row[3]), row[4], row[5])


def _read_projection(conn: sqlite3.Connection, name: str) -> ProjectionState | None:
    row = conn.execute(f"SELECT {_PROJECTION} WHERE name = ?", (name,)).fetchone()
    return None if row is None else _projection_state(row)


def _save_projection(conn: sqlite3.Connection, state: ProjectionState, now: int) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO tidings_projections (name, generation, position, updated_at, "
        "building_generation, building_position) VALUES (?, ?, ?, ?, ?, ?)",
        (
            state.name,
            state.generation,
            state.position,
            now,
            state.building_generation,
            state.building_position,
        ),
    )


def _generation_of(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT generation FROM tidings_projections WHERE name = ?", (name,))
    found = row.fetchone()
    return 0 if found is None else int(found[0])
