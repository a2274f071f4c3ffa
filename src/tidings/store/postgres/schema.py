"""The PostgreSQL store's tables, version by version, and the migration that brings a schema
up to date when the store opens (one process migrates, the others wait).

Version 1 held the append function `tidings_append` (PL/pgSQL), which `append` calls;
version 6 replaces it with the one that also stores tags and checks append conditions, and
version 7 rewrites that one in fewer statements, planned by index only (`_append_function`).
"""

from __future__ import annotations

from typing import Any

from tidings.core.errors import StoreNotFound
from tidings.store.postgres.connection import PostgresCore

__all__ = ["PostgresSchema"]

_NO_TIMEOUT = 86_400.0  # seconds: the query_timeout of a migration (a day: none, in effect)


# The columns an event and a snapshot share: what was recorded, where, as which type.
_RECORDED = """stream_id      bytea       NOT NULL,
                    version        bigint      NOT NULL,
                    type           text        NOT NULL,
                    schema_version integer     NOT NULL,
                    recorded_at    timestamptz NOT NULL,
                    data           text        NOT NULL"""


def _migrations(schema: str) -> list[tuple[int, list[str]]]:
    """The tables, version by version, in `schema` (a validated identifier)."""
    s = f'"{schema}"'
    return [
        (
            1,
            [
                f"CREATE SEQUENCE {s}.tidings_positions AS bigint",
                f"""CREATE TABLE {s}.tidings_events (
                    position       bigint      PRIMARY KEY,
                    id             uuid        NOT NULL UNIQUE,
                    {_RECORDED},
                    metadata       text,
                    UNIQUE (stream_id, version)
                )""",
                f"""CREATE TABLE {s}.tidings_streams (
                    stream_id bytea  PRIMARY KEY,
                    version   bigint NOT NULL
                )""",
                f"""CREATE FUNCTION {s}.tidings_append(
                    p_stream bytea, p_expected bigint, p_ids uuid[], p_types text[],
                    p_schema_versions integer[], p_data text[], p_metadata text
                ) RETURNS TABLE (ok boolean, version bigint, last_position bigint)
                LANGUAGE plpgsql AS $$
                DECLARE
                    v_actual bigint;
                    v_count integer := cardinality(p_ids);
                    v_positions bigint[];
                BEGIN
                    -- The transaction id first: a reader's hole check relies on every writer
                    -- holding its id before it draws a position.
                    PERFORM pg_current_xact_id();
                    SELECT s.version INTO v_actual FROM {s}.tidings_streams s
                        WHERE s.stream_id = p_stream FOR UPDATE;
                    IF NOT FOUND THEN
                        INSERT INTO {s}.tidings_streams (stream_id, version)
                            VALUES (p_stream, 0) ON CONFLICT DO NOTHING;
                        SELECT s.version INTO v_actual FROM {s}.tidings_streams s
                            WHERE s.stream_id = p_stream FOR UPDATE;
                    END IF;
                    -- A clash or a retry of stored events returns before drawing positions,
                    -- so neither leaves a hole in the log.
                    IF NOT (p_expected = -1 OR (p_expected = -2 AND v_actual > 0)
                            OR p_expected = v_actual)
                       OR EXISTS (SELECT 1 FROM {s}.tidings_events e WHERE e.id = ANY(p_ids))
                    THEN
                        RETURN QUERY SELECT false, v_actual, 0::bigint;
                        RETURN;
                    END IF;
                    IF v_count = 1 THEN
                        v_positions := ARRAY[nextval('{s}.tidings_positions')];
                    ELSE
                        SELECT array_agg(p ORDER BY p) INTO v_positions FROM (
                            SELECT nextval('{s}.tidings_positions') AS p
                            FROM generate_series(1, v_count)
                        ) drawn;
                    END IF;
                    INSERT INTO {s}.tidings_events (position, id, stream_id, version, type,
                        schema_version, recorded_at, data, metadata)
                    SELECT v_positions[t.n], t.id, p_stream, v_actual + t.n, t.type, t.sv,
                        now(), t.data, p_metadata
                    FROM unnest(p_ids, p_types, p_schema_versions, p_data)
                        WITH ORDINALITY AS t(id, type, sv, data, n);
                    UPDATE {s}.tidings_streams SET version = v_actual + v_count
                        WHERE stream_id = p_stream;
                    RETURN QUERY SELECT true, v_actual + v_count, v_positions[v_count];
                END
                $$""",
            ],
        ),
        (
            2,
            [
                f"""CREATE TABLE {s}.tidings_snapshots (
                    {_RECORDED},
                    PRIMARY KEY (stream_id, version)
                )""",
                f"""CREATE TABLE {s}.tidings_projections (
                    name                text        PRIMARY KEY,
                    generation          integer     NOT NULL,
                    position            bigint      NOT NULL,
                    updated_at          timestamptz NOT NULL,
                    building_generation integer,
                    building_position   bigint      NOT NULL DEFAULT 0
                )""",
                f"""CREATE TABLE {s}.tidings_documents (
                    projection text    NOT NULL,
                    generation integer NOT NULL,
                    key        bytea   NOT NULL,
                    doc        text    NOT NULL,
                    PRIMARY KEY (projection, generation, key)
                )""",
            ],
        ),
        (
            3,
            [
                f"""CREATE TABLE {s}.tidings_leases (
                    name       text        PRIMARY KEY,
                    owner      text        NOT NULL,
                    expires_at timestamptz NOT NULL
                )""",
            ],
        ),
        (
            4,
            [
                f"""CREATE TABLE {s}.tidings_subject_keys (
                    subject text PRIMARY KEY,
                    key     text NOT NULL  -- hex; this store's connections read bytea as text
                )""",
            ],
        ),
        (
            5,
            [  # `tidings trace`: one correlation's events without a scan of the log
                f"""CREATE INDEX tidings_events_correlation ON {s}.tidings_events
                    (((metadata::jsonb) ->> 'correlation_id'), position)
                    WHERE metadata IS NOT NULL""",
            ],
        ),
        (
            6,
            [  # dynamic consistency boundaries: tags, the tag and type indexes, conditions
                f"ALTER TABLE {s}.tidings_events ADD COLUMN tags text[]",
                f"""CREATE TABLE {s}.tidings_tags (
                    tag      text   NOT NULL,
                    position bigint NOT NULL,
                    PRIMARY KEY (tag, position)
                )""",
                f"CREATE INDEX tidings_events_type ON {s}.tidings_events (type, position)",
                f"DROP FUNCTION {s}.tidings_append(bytea, bigint, uuid[], text[], integer[], "
                "text[], text)",  # version 1's
                _append_function(s),
            ],
        ),
        (
            7,
            [_append_function(s)],  # the same function in fewer statements, by index only
        ),
    ]


def _append_function(s: str) -> str:
    """`tidings_append`: one round trip per append, conditioned or not.

    Locks, in this order (the same for every writer, so none deadlock): the stream's row;
    then advisory keys, sorted (`p_locks`, shared or exclusive per `p_exclusive`; see
    `append._locks`). A conditioned append holds its query's keys exclusively while it
    checks and writes; every append holds its own events' keys shared while it draws
    positions and commits. Appends whose queries and events do not overlap share no key
    exclusively, so they never wait for each other.

    Version 6 created it; version 7 replaced its body with this one, which does the same in
    fewer statements (each is a cost on every append): the stream's row made, locked and
    moved on in one (and put back on a refusal), the keys in one, the condition in one, no
    separate look at the transaction id (locking the row takes one), the result set by
    assignment. (A schema migrating from before 6 runs both: same result.)

    It plans with sequential scans off. PL/pgSQL keeps a generic plan of each statement for
    the session, made from the statistics of the moment: a connection that first appends
    while the log is small planned `e.id = ANY(p_ids)` as a sequential scan and kept it, so
    its appends slowed with every event stored (measured on one connection: 213 us per
    append at 2,000 events, 651 us at 10,000) until the pool replaced it.
    """
    return f"""CREATE OR REPLACE FUNCTION {s}.tidings_append(
        p_stream bytea, p_expected bigint, p_ids uuid[], p_types text[],
        p_schema_versions integer[], p_data text[], p_metadata text, p_tags text[],
        p_locks bigint[], p_exclusive boolean[], p_query jsonb, p_after bigint
    ) RETURNS TABLE (ok boolean, version bigint, last_position bigint,
                     conflict_position bigint, conflict_type text)
    LANGUAGE plpgsql SET enable_seqscan = off AS $$
    DECLARE
        v_actual bigint;
        v_count integer := cardinality(p_ids);
        v_positions bigint[];
    BEGIN
        ok := false;
        last_position := 0;
        -- The stream's row, made or locked and moved on in one statement (it is put back
        -- if the append goes no further). Taking the lock gives this transaction its id
        -- before it draws a position, which a reader's hole check relies on.
        INSERT INTO {s}.tidings_streams AS s (stream_id, version) VALUES (p_stream, v_count)
            ON CONFLICT (stream_id) DO UPDATE SET version = s.version + v_count
            RETURNING s.version - v_count INTO v_actual;
        version := v_actual;
        -- A clash or a retry of stored events returns before drawing positions,
        -- so neither leaves a hole in the log.
        IF NOT (p_expected = -1 OR (p_expected = -2 AND v_actual > 0)
                OR p_expected = v_actual)
           OR EXISTS (SELECT 1 FROM {s}.tidings_events e WHERE e.id = ANY(p_ids))
        THEN
            UPDATE {s}.tidings_streams SET version = v_actual WHERE stream_id = p_stream;
            RETURN NEXT;
            RETURN;
        END IF;
        -- In array order, which is sorted: unnest yields its elements in order.
        PERFORM CASE WHEN l.exclusive THEN pg_advisory_xact_lock(l.key)
                     ELSE pg_advisory_xact_lock_shared(l.key) END
            FROM unnest(p_locks, p_exclusive) AS l(key, exclusive);
        -- The condition, under its keys: every earlier writer of a matching event has
        -- committed (each statement reads a fresh snapshot), every later one waits.
        -- Each item is read by its first tag, else by each of its types, else whole.
        IF p_query IS NOT NULL THEN
            SELECT f.position, f.type INTO conflict_position, conflict_type
            FROM jsonb_array_elements(p_query) AS q(item)
            CROSS JOIN LATERAL (
                SELECT ARRAY(SELECT jsonb_array_elements_text(q.item -> 'tags')) AS tags,
                    CASE WHEN jsonb_typeof(q.item -> 'types') = 'array' THEN
                        ARRAY(SELECT jsonb_array_elements_text(q.item -> 'types'))
                    END AS types
            ) AS i
            CROSS JOIN LATERAL (
                (SELECT e.position, e.type
                    FROM {s}.tidings_tags t JOIN {s}.tidings_events e
                        ON e.position = t.position
                    WHERE cardinality(i.tags) > 0 AND t.tag = i.tags[1]
                        AND t.position > p_after AND e.tags @> i.tags
                        AND (i.types IS NULL OR e.type = ANY(i.types))
                    ORDER BY t.position LIMIT 1)
                UNION ALL
                (SELECT e.position, e.type FROM {s}.tidings_events e
                    WHERE cardinality(i.tags) = 0 AND i.types IS NULL
                        AND e.position > p_after
                    ORDER BY e.position LIMIT 1)
                UNION ALL
                (SELECT x.position, x.type
                    FROM unnest(CASE WHEN cardinality(i.tags) = 0 THEN i.types END)
                        AS n(name)
                    CROSS JOIN LATERAL (
                        SELECT e.position, e.type FROM {s}.tidings_events e
                        WHERE e.type = n.name AND e.position > p_after
                        ORDER BY e.position LIMIT 1
                    ) AS x)
            ) AS f
            ORDER BY f.position LIMIT 1;
            IF conflict_position IS NOT NULL THEN
                -- The same events, committed while this waited for its keys, are a retry
                -- (the caller returns the original result); anything else is the conflict.
                IF EXISTS (SELECT 1 FROM {s}.tidings_events e WHERE e.id = ANY(p_ids)) THEN
                    conflict_position := NULL;
                    conflict_type := NULL;
                END IF;
                UPDATE {s}.tidings_streams SET version = v_actual WHERE stream_id = p_stream;
                RETURN NEXT;
                RETURN;
            END IF;
        END IF;
        IF v_count = 1 THEN
            v_positions := ARRAY[nextval('{s}.tidings_positions')];
        ELSE
            SELECT array_agg(p ORDER BY p) INTO v_positions FROM (
                SELECT nextval('{s}.tidings_positions') AS p
                FROM generate_series(1, v_count)
            ) drawn;
        END IF;
        INSERT INTO {s}.tidings_events (position, id, stream_id, version, type,
            schema_version, recorded_at, data, metadata, tags)
        SELECT v_positions[t.n], t.id, p_stream, v_actual + t.n, t.type, t.sv,
            now(), t.data, p_metadata, string_to_array(t.tags, chr(31))
        FROM unnest(p_ids, p_types, p_schema_versions, p_data, p_tags)
            WITH ORDINALITY AS t(id, type, sv, data, tags, n);
        IF array_to_string(p_tags, '') <> '' THEN  -- (NULLs, no tags, are left out)
            INSERT INTO {s}.tidings_tags (tag, position)
            SELECT g.tag, v_positions[t.n]
            FROM unnest(p_tags) WITH ORDINALITY AS t(tags, n),
                unnest(string_to_array(t.tags, chr(31))) AS g(tag)
            WHERE t.tags IS NOT NULL;
        END IF;
        ok := true;
        version := v_actual + v_count;
        last_position := v_positions[v_count];
        RETURN NEXT;
    END
    $$"""


async def _schema_version(conn: Any, schema: str) -> int | None:
    exists = await conn.fetchval(
        "SELECT 1 FROM information_schema.tables WHERE table_schema = $1 "
        "AND table_name = 'tidings_schema'",
        schema,
    )
    if not exists:
        return None
    found = await conn.fetchval(f'SELECT coalesce(max(version), 0) FROM "{schema}".tidings_schema')
    return int(found)


class PostgresSchema(PostgresCore):
    """Creating or migrating the schema, as the store opens."""

    async def _prepare(self) -> None:
        """Create or migrate the schema: one process migrates, the others wait, then see it."""
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            current = await _schema_version(conn, self.schema)  # (under query_timeout)
            migrations = _migrations(self.schema)
            if current is not None and current >= migrations[-1][0]:
                return
            if not self.create:
                raise StoreNotFound(
                    f"PostgreSQL {self.address} schema {self.schema!r} (no tidings tables)"
                )
            async with conn.transaction():
                # Another process's migration, or this one, may take long: no query_timeout.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))",
                    f"tidings:{self.schema}",
                    timeout=_NO_TIMEOUT,
                )
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._s}", timeout=_NO_TIMEOUT)
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._s}.tidings_schema (version integer)",
                    timeout=_NO_TIMEOUT,
                )
                current = await conn.fetchval(
                    f"SELECT coalesce(max(version), 0) FROM {self._s}.tidings_schema",
                    timeout=_NO_TIMEOUT,
                )
                for version, statements in migrations:
                    if version > current:
                        for statement in statements:
                            await conn.execute(statement, timeout=_NO_TIMEOUT)
                        await conn.execute(
                            f"INSERT INTO {self._s}.tidings_schema (version) VALUES ($1)",
                            version,
                            timeout=_NO_TIMEOUT,
                        )
