"""Snapshots, projection checkpoints and rebuilds, read-model documents, and the personal-data
keys of the PostgreSQL store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from tidings.core.personal import new_key
from tidings.store.base import (
    DocumentNotLoaded,
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
from tidings.store.postgres.connection import PostgresCore

__all__ = ["PostgresPersonalData", "PostgresProjections"]


class PostgresProjections(PostgresCore):
    """Snapshots, checkpoints (commit, rebuild) and documents."""

    # -- snapshots -------------------------------------------------------------------------

    async def _save_snapshot(
        self, stream_id: str, version: int, type: str, schema_version: int, data: str
    ) -> None:
        await self._execute(
            f"INSERT INTO {self._s}.tidings_snapshots (stream_id, version, type, "
            "schema_version, recorded_at, data) VALUES ($1, $2, $3, $4, now(), $5) "
            "ON CONFLICT (stream_id, version) DO UPDATE SET type = excluded.type, "
            "schema_version = excluded.schema_version, recorded_at = excluded.recorded_at, "
            "data = excluded.data",
            stream_id,
            version,
            type,
            schema_version,
            data,
        )

    async def _read_snapshot(
        self, stream_id: str, max_version: int | None, recorded_until: datetime | None
    ) -> Snapshot | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT stream_id, version, type, schema_version, recorded_at, data "
                f"FROM {self._s}.tidings_snapshots WHERE stream_id = $1 "
                "AND ($2::bigint IS NULL OR version <= $2) "
                "AND ($3::timestamptz IS NULL OR recorded_at <= $3) "
                "ORDER BY version DESC LIMIT 1",
                stream_id,
                max_version,
                recorded_until,
            )
        return None if row is None else Snapshot(*row)

    # -- projections -----------------------------------------------------------------------

    async def _projection_states(self, name: str | None) -> list[ProjectionState]:
        async with self._connection() as conn:
            if name is None:
                rows = await conn.fetch(f"SELECT {self._projection_columns()} ORDER BY name")
            else:
                rows = await conn.fetch(
                    f"SELECT {self._projection_columns()} WHERE name = $1", name
                )
        return [ProjectionState(*row) for row in rows]

    def _projection_columns(self) -> str:
        return (
            "name, generation, position, updated_at, building_generation, building_position "
            f"FROM {self._s}.tidings_projections"
        )

    async def _locked_projection(self, conn: Any, name: str) -> ProjectionState | None:
        row = await conn.fetchrow(
            f"SELECT {self._projection_columns()} WHERE name = $1 FOR UPDATE", name
        )
        return None if row is None else ProjectionState(*row)

    async def _save_projection(
        self, conn: Any, state: ProjectionState, *, replace: bool = True
    ) -> None:
        """Write a checkpoint row; `replace=False` leaves a row someone else made alone."""
        keep = (
            "DO UPDATE SET generation = excluded.generation, "
            "position = excluded.position, updated_at = excluded.updated_at, "
            "building_generation = excluded.building_generation, "
            "building_position = excluded.building_position"
            if replace
            else "DO NOTHING"
        )
        await conn.execute(
            f"INSERT INTO {self._s}.tidings_projections (name, generation, position, updated_at, "
            "building_generation, building_position) VALUES ($1, $2, $3, now(), $4, $5) "
            f"ON CONFLICT (name) {keep}",
            state.name,
            state.generation,
            state.position,
            state.building_generation,
            state.building_position,
        )

    @asynccontextmanager
    async def _projection_transaction(self, name: str, documents: str | None = None) -> Any:
        """A transaction holding the projection's checkpoint row (or its absence) locked;
        for a segment's checkpoint, its projection's row is read first, shared (the order a
        rebuild's swap locks them in too, so neither waits for the other in a cycle). Yields
        the connection, the row, and the projection's row (None when not a segment)."""
        async with self._connection() as conn, conn.transaction():
            # Serialises first commits too, when there is no row to lock yet.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"tidings:{self.schema}:{name}"
            )
            main = await self._shared_projection(conn, documents) if documents else None
            yield conn, await self._locked_projection(conn, name), main

    async def _commit_projection(self, commit: ProjectionCommit) -> None:
        name, generation, writes = commit.name, commit.generation, commit.writes
        owner = commit.documents or name
        upserts = [(key, doc) for key, doc in writes.items() if doc is not None]
        deletes = [key for key, doc in writes.items() if doc is None]
        async with self._projection_transaction(name, commit.documents) as (conn, current, main):
            now = await conn.fetchval("SELECT now()")
            state = advance_projection(current, commit, now)
            if commit.documents is not None:
                # Shared with the other segments and a rebuild: created only if nobody did
                # (a rebuild starting meanwhile must not be overwritten).
                created = documents_owner(main, commit, now)
                if created is not None:
                    await self._save_projection(conn, created, replace=False)
            if upserts:
                await conn.execute(
                    f"INSERT INTO {self._s}.tidings_documents (projection, generation, key, doc) "
                    "SELECT $1, $2, k, d FROM unnest($3::bytea[], $4::text[]) AS t(k, d) "
                    "ON CONFLICT (projection, generation, key) DO UPDATE SET doc = excluded.doc",
                    owner,
                    generation,
                    [key for key, _ in upserts],
                    [doc for _, doc in upserts],
                )
            if deletes:
                await conn.execute(
                    f"DELETE FROM {self._s}.tidings_documents WHERE projection = $1 "
                    "AND generation = $2 AND key = ANY($3::bytea[])",
                    owner,
                    generation,
                    deletes,
                )
            await self._save_projection(conn, state)

    async def _start_rebuild(self, name: str) -> ProjectionState:
        async with self._projection_transaction(name) as (conn, current, _):
            state = begin_rebuild(current, name, await conn.fetchval("SELECT now()"))
            await conn.execute(  # what an aborted rebuild left behind
                f"DELETE FROM {self._s}.tidings_documents WHERE projection = $1 "
                "AND generation <> $2",
                name,
                state.generation,
            )
            await self._save_projection(conn, state)
        return state

    async def _finish_rebuild(self, name: str, generation: int, segments: int) -> None:
        async with self._projection_transaction(name) as (conn, current, _):
            now = await conn.fetchval("SELECT now()")
            state = swap_rebuild(current, name, generation, now)
            await conn.execute(
                f"DELETE FROM {self._s}.tidings_documents WHERE projection = $1 "
                "AND generation <> $2",
                name,
                generation,
            )
            await self._save_projection(conn, state)
            await conn.execute(
                f"DELETE FROM {self._s}.tidings_projections WHERE starts_with(name, $1)",
                segment_prefix(name),
            )
            for row in segment_rows(name, segments, generation, state.position, now):
                await self._save_projection(conn, row)

    async def _shared_projection(self, conn: Any, name: str) -> ProjectionState | None:
        row = await conn.fetchrow(
            f"SELECT {self._projection_columns()} WHERE name = $1 FOR SHARE", name
        )
        return None if row is None else ProjectionState(*row)

    def _live_generation(self) -> str:
        return (
            f"coalesce($2::integer, (SELECT generation FROM {self._s}.tidings_projections "
            "WHERE name = $1), 0)"
        )

    async def _get_documents(
        self, name: str, generation: int | None, keys: Sequence[str]
    ) -> dict[str, str]:
        rows = await self._fetch(
            f"SELECT key, doc FROM {self._s}.tidings_documents WHERE projection = $1 "
            f"AND generation = {self._live_generation()} AND key = ANY($3::bytea[])",
            name,
            generation,
            list(keys),
        )
        return {key: doc for key, doc in rows}

    async def _documents_batch(
        self, name: str, generation: int | None, after: str, limit: int
    ) -> list[tuple[str, str]]:
        rows = await self._fetch(
            f"SELECT key, doc FROM {self._s}.tidings_documents WHERE projection = $1 "
            f"AND generation = {self._live_generation()} AND key > $3 ORDER BY key LIMIT $4",
            name,
            generation,
            after,
            limit,
        )
        return [(key, doc) for key, doc in rows]

    def _document_reader(self, name: str, generation: int) -> Callable[[str], str | None]:
        return _DocumentCache(self, name, generation)


class PostgresPersonalData(PostgresCore):
    """The keys of personal data, and forgetting a subject."""

    async def _subject_keys(self, subjects: set[str], create: bool) -> dict[str, bytes]:
        wanted = sorted(subjects)
        async with self._connection() as conn:
            if create:
                await conn.execute(
                    f"INSERT INTO {self._s}.tidings_subject_keys (subject, key) "
                    "SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
                    wanted,
                    [new_key().hex() for _ in wanted],
                )
            rows = await conn.fetch(
                f"SELECT subject, key FROM {self._s}.tidings_subject_keys "
                "WHERE subject = ANY($1::text[])",
                wanted,
            )
        return {row[0]: bytes.fromhex(row[1]) for row in rows}

    async def _forget(self, subject: str) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                f"DELETE FROM {self._s}.tidings_subject_keys WHERE subject = $1", subject
            )
            await conn.execute(f"DELETE FROM {self._s}.tidings_snapshots")


class _DocumentCache:
    """Document lookups for one batch: PostgreSQL can only be read with `await`, so a key not
    loaded yet raises `DocumentNotLoaded`; the projection loads it and runs the event again."""

    def __init__(self, store: PostgresProjections, name: str, generation: int) -> None:
        self.store = store
        self.name = name
        self.generation = generation
        self.loaded: dict[str, str | None] = {}

    def __call__(self, key: str) -> str | None:
        try:
            return self.loaded[key]
        except KeyError:
            raise DocumentNotLoaded(key) from None

    async def load(self, keys: Sequence[str]) -> None:
        found = await self.store._get_documents(self.name, self.generation, keys)
        for key in keys:
            self.loaded[key] = found.get(key)
