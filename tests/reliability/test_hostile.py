"""Hostile input (issue 10): nothing anyone can put in front of tidings crashes a worker,
corrupts the store or runs code. Each hostile input is refused or dead-lettered with a clear
reason, and the valid input around it still gets through, once.

1. Stored rows written around tidings into SQLite's and PostgreSQL's tables (bad JSON, wrong
   types, huge numbers, odd metadata, unknown types and versions, ids and times no driver can
   read): every read path (`read_all`, `read_stream`, `subscribe`, a `ProjectionRunner`,
   `tidings tail` and `tidings events`) fails with a tidings error naming the row, or shows an
   `UnknownEvent` where `keep_unknown` asks for one; nothing hangs; the store stays whole. The
   row decoder itself is fuzzed with hypothesis, and so are the CLI's arguments.
2. CloudEvents on the wire: every adapter's own decoder (NATS and HTTP `ce-`, AMQP
   `cloudEvents_`, Kafka `ce_` in binary mode; Redis, SQS, EventBridge in structured mode)
   fuzzed with hypothesis, each result decoded, dead-lettered and re-encoded for a replay;
   then a catalogue of hostile messages published with each broker's plain client (memory,
   Redis, NATS, RabbitMQ on loopback) between valid ones, to a running `Service`.
3. Upcasters that raise, return no dict, recurse or go round in a loop.
4. Oversized events and headers: 10 MB of data, 1,000 headers, a 64 KB header value, in the
   stores and on every broker, published by tidings and by a foreign producer.
5. Stream ids, metadata, projection, document, lease and subject names crafted for SQL;
   positions and versions beyond 64 bits.
6. The console: markup in every field on every page, actions without the token, path
   traversal, odd query parameters.
7. Message types naming Python objects (`os.system`, `builtins.eval`, a module that must not
   load): never imported, never instantiated.
8. atheris (coverage-guided) over the structured CloudEvent decoder and the stored-row decoder,
   in a subprocess, bounded by runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import random
import resource
import sqlite3
import subprocess
import sys
import time
import tracemalloc
import types
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing, closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import tidings
from tests.backends import (
    BROKER_BACKENDS,
    NATS,
    POSTGRES,
    RABBITMQ,
    REDIS,
    broker_url,
    discard,
    require,
    store_url,
)
from tests.reliability.harness import Row, reliability, report, scale, stopwatch
from tidings import (
    Event,
    EventDecodeError,
    Projection,
    ProjectionRunner,
    StoreError,
    TidingsError,
    TypeRegistry,
    on,
    upcaster,
)
from tidings.brokers import DeadLetter, Message, open_broker
from tidings.brokers.base import BrokerBase
from tidings.cli.main import app as cli
from tidings.core.codec import JSONCodec
from tidings.core.errors import (
    EventDefinitionError,
    EventTooLarge,
    InvalidCloudEvent,
    InvalidMetadata,
    InvalidStreamId,
)
from tidings.core.events import UnknownEvent
from tidings.core.ids import uuid_from_bytes
from tidings.store import open_store

pytestmark = [reliability]

FIXED_ID = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
READ_TIMEOUT = 15.0  # seconds any one read may take before it counts as a hang


class Item(Event, type="hostile.item"):
    """The one valid event of these scenarios (default registry, so the CLI reads it)."""

    n: int
    note: str = ""


class Big(Event, type="hostile.big"):
    blob: str


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def attempt(
    make: Callable[[], AsyncIterator[Any]], limit: int = 1, timeout: float = READ_TIMEOUT
) -> tuple[list[Any], BaseException | None]:
    """Up to `limit` items of a read, and the error it ended with (a `_Hung` on a timeout)."""
    items: list[Any] = []
    try:
        async with asyncio.timeout(timeout), aclosing(make()) as reading:  # type: ignore[type-var]
            async for item in reading:
                items.append(item)
                if len(items) >= limit:
                    break
    except TimeoutError:
        return items, _Hung(f"no answer within {timeout} s")
    except Exception as exc:
        return items, exc
    return items, None


class _Hung(Exception):
    """A read that neither answered nor failed in time."""


# -- 1. stored rows ---------------------------------------------------------------------------

REFUSED, UNKNOWN, UNREADABLE = "refused", "unknown", "unreadable"


@dataclass(frozen=True)
class Corrupt:
    """A row written around tidings: its columns apart from a valid row's, and what every
    read must do with it: fail naming it (`refused`), do so unless `keep_unknown` asks for an
    `UnknownEvent` (`unknown`), or fail as a `StoreError` saying `detail` when the driver
    itself cannot read the value (`unreadable`: the whole fetch fails, so no position)."""

    name: str
    columns: Mapping[str, Any]
    outcome: str
    detail: str = ""


COMMON_CORRUPT = [
    Corrupt("data not JSON", {"data": "{not json"}, REFUSED),
    Corrupt("data of the wrong types", {"data": '{"n": "many"}'}, REFUSED),
    Corrupt("data a 5,000-digit number", {"data": '{"n": ' + "9" * 5000 + "}"}, REFUSED),
    Corrupt("data JSON null", {"data": "null"}, REFUSED),
    Corrupt("data nested 100,000 deep", {"data": "[" * 100_000}, REFUSED),
    Corrupt("metadata a JSON list", {"metadata": "[1, 2]"}, REFUSED),
    Corrupt("metadata headers not text", {"metadata": '{"headers": {"n": 1}}'}, REFUSED),
    Corrupt("type os.system", {"type": "os.system"}, UNKNOWN),
    Corrupt("type a class's dotted path", {"type": "tidings.core.events.Event"}, UNKNOWN),
    Corrupt("schema version 99", {"schema_version": 99}, UNKNOWN),
    Corrupt("schema version -1", {"schema_version": -1}, UNKNOWN),
]
SQLITE_CORRUPT = [
    *COMMON_CORRUPT,
    Corrupt("data not UTF-8", {"data": b"\xff\xfe\x00"}, REFUSED),
    Corrupt("id of 2 bytes", {"id": b"\x01\x02"}, REFUSED),
    Corrupt("id as text", {"id": "not-a-uuid"}, REFUSED),
    Corrupt("time as text", {"recorded_at": "yesterday"}, REFUSED),
    Corrupt("time 2**63-1 microseconds", {"recorded_at": 2**63 - 1}, REFUSED),
    Corrupt("version as text", {"version": "one"}, REFUSED),
    Corrupt("stream id a BLOB", {"stream_id": b"\xff\xfe"}, REFUSED),
]
POSTGRES_CORRUPT = [
    *COMMON_CORRUPT,
    Corrupt("time infinity", {"recorded_at": "infinity"}, REFUSED),
    Corrupt(
        "time before year 1",
        {"recorded_at": "4000-01-01 BC"},
        UNREADABLE,
        "date value out of range",
    ),
    Corrupt("stream id not UTF-8", {"stream_id": b"\xff\xfe"}, UNREADABLE, "not UTF-8"),
]


@dataclass
class Placed:
    """A corrupt row as stored: where, and in which stream (None: not text)."""

    corrupt: Corrupt
    position: int
    stream_id: Any

    @property
    def addressable(self) -> bool:
        return isinstance(self.stream_id, str)


def _row(corrupt: Corrupt, number: int, backend: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": uuid.uuid4().bytes if backend == "sqlite" else uuid.uuid4(),
        "stream_id": f"corrupt-{number:02}",
        "version": 1,
        "type": "hostile.item",
        "schema_version": 1,
        "recorded_at": 1_767_323_045_000_000 if backend == "sqlite" else "now",
        "data": '{"n": -1}',
        "metadata": None,
    }
    row.update(corrupt.columns)
    if backend == "postgres" and isinstance(row["stream_id"], str):
        row["stream_id"] = row["stream_id"].encode()
    return row


def _insert_sqlite(path: str, rows: list[dict[str, Any]]) -> list[int]:
    positions = []
    with closing(sqlite3.connect(path)) as conn:
        for row in rows:
            cursor = conn.execute(
                "INSERT INTO tidings_events (id, stream_id, version, type, schema_version, "
                "recorded_at, data, metadata) VALUES (:id, :stream_id, :version, :type, "
                ":schema_version, :recorded_at, :data, :metadata)",
                row,
            )
            positions.append(int(cursor.lastrowid or 0))
            conn.execute(
                "INSERT OR IGNORE INTO tidings_streams (stream_id, version) VALUES (?, 1)",
                (row["stream_id"],),
            )
        conn.commit()
    return positions


async def _insert_postgres(schema: str, rows: list[dict[str, Any]]) -> list[int]:
    import asyncpg  # type: ignore[import-untyped]

    s = f'"{schema}"'
    conn = await asyncpg.connect(POSTGRES)
    positions = []
    try:
        for row in rows:
            position = await conn.fetchval(
                f"INSERT INTO {s}.tidings_events (position, id, stream_id, version, type, "
                f"schema_version, recorded_at, data, metadata) VALUES "
                f"(nextval('{s}.tidings_positions'), $1, $2, $3, $4, $5, "
                f"$6::text::timestamptz, $7, $8) RETURNING position",
                *(row[k] for k in ("id", "stream_id", "version", "type", "schema_version")),
                *(row[k] for k in ("recorded_at", "data", "metadata")),
            )
            positions.append(int(position))
            await conn.execute(
                f"INSERT INTO {s}.tidings_streams (stream_id, version) VALUES ($1, 1) "
                "ON CONFLICT DO NOTHING",
                row["stream_id"],
            )
    finally:
        await conn.close()
    return positions


async def _tables(backend: str, url: str) -> dict[str, int]:
    """Every table of the store with its row count (to see that nothing was dropped)."""
    if backend == "sqlite":
        with closing(sqlite3.connect(_sqlite_path(url))) as conn:
            names = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
    if backend == "postgres":
        import asyncpg

        schema = dict(parse_qsl(urlsplit(url).query))["schema"]
        conn = await asyncpg.connect(POSTGRES)
        try:
            names = [
                r[0]
                for r in await conn.fetch(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                    schema,
                )
            ]
            return {n: await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{n}"') for n in names}
        finally:
            await conn.close()
    return {}


def _sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def _judge(placed: Placed, items: list[Any], error: BaseException | None, keep: bool) -> str:
    """'' when a read did what it must with the corrupt row, else what it did instead."""
    corrupt = placed.corrupt
    if corrupt.outcome == UNREADABLE:
        ok = isinstance(error, StoreError) and corrupt.detail in str(error)
    elif corrupt.outcome == UNKNOWN and keep:
        ok = (
            error is None
            and len(items) == 1
            and isinstance(items[0].event, UnknownEvent)
            and items[0].position == placed.position
        )
    else:
        ok = (
            isinstance(error, EventDecodeError)
            and error.position == placed.position
            and error.stream_id == placed.stream_id
            and f"position {placed.position}" in str(error)
        )
    return "" if ok else f"got {items!r:.200} / {error!r:.300}"


class RowsSeen(Projection, name="hostile_rows"):
    """Handles `Item`: the runner reads only rows of that type (a type filter)."""

    @on(Item)
    def item(self, event: Item, record: Any) -> None:
        self.view.put(str(event.n), True)


def _projection(number: int) -> Projection:
    """A fresh projection (its own name, so its own checkpoint) handling `Item`."""
    cls = types.new_class(
        f"RowsSeen{number}", (RowsSeen,), {"name": f"hostile_rows_{number}"}, lambda ns: None
    )
    return cls()  # type: ignore[no-any-return]


async def _records(batches: AsyncIterator[tuple[list[Any], int]]) -> AsyncIterator[Any]:
    async with aclosing(batches):  # type: ignore[type-var]
        async for records, _ in batches:
            for record in records:
                yield record


async def _check_reads(url: str, placed: list[Placed]) -> list[str]:
    """Every store read path against every corrupt row."""
    problems: list[str] = []
    async with open_store(url) as store:
        for p in placed:
            paths: list[tuple[str, Callable[[], AsyncIterator[Any]], bool]] = [
                ("read_all", lambda p=p: store.read_all(p.position - 1, limit=1), False),
                (
                    "read_all(keep_unknown)",
                    lambda p=p: store.read_all(p.position - 1, limit=1, keep_unknown=True),
                    True,
                ),
                ("subscribe", lambda p=p: store.subscribe(p.position - 1), False),
                (  # a batch is decoded whole: one row, so the next corrupt one stays out
                    "subscribe_batches(keep_unknown)",
                    lambda p=p: _records(
                        store.subscribe_batches(p.position - 1, limit=1, keep_unknown=True)
                    ),
                    True,
                ),
            ]
            if p.addressable and p.corrupt.outcome != UNREADABLE:
                paths += [
                    ("read_stream", lambda p=p: store.read_stream(p.stream_id), False),
                    (
                        "read_stream(keep_unknown)",
                        lambda p=p: store.read_stream(p.stream_id, keep_unknown=True),
                        True,
                    ),
                ]
            for name, make, keep in paths:
                items, error = await attempt(make)
                if verdict := _judge(p, items, error, keep):
                    problems.append(f"{p.corrupt.name} | {name}: {verdict}")
            # a projection whose checkpoint is just before the row
            projection = _projection(p.position)
            runner = ProjectionRunner(store, [projection])
            await store.commit_projection(projection.name, 1, 0, p.position - 1, {})
            decoded = p.corrupt.outcome == UNREADABLE or p.corrupt.columns.get(
                "type", "hostile.item"
            ) == ("hostile.item")
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    await runner.catch_up()
                error = None
            except Exception as exc:
                error = exc
            state = await store.projection_state(projection.name)
            if decoded:  # it must stop on the row, naming it, its checkpoint before it
                verdict = _judge(p, [], error, False)
                if verdict or state is None or state.position != p.position - 1:
                    problems.append(f"{p.corrupt.name} | runner: {verdict} (at {state})")
            elif not (  # filtered out by type: past it, or failing on a later corrupt row
                (error is None and state is not None and state.position >= p.position)
                or getattr(error, "position", 0) > p.position
            ):
                problems.append(f"{p.corrupt.name} | runner passing it: {error!r:.300}")
        # and a runner following the log in the background meets the first decoded one
        first = next(
            (p for p in placed if p.corrupt.columns.get("type", "hostile.item") == "hostile.item"),
            None,
        )
        if first is None or first.corrupt.outcome == UNREADABLE:
            return problems  # a StoreError: a running runner retries those (logged)
        projection = _projection(1000 + first.position)
        await store.commit_projection(projection.name, 1, 0, first.position - 1, {})
        async with ProjectionRunner(store, [projection]) as runner:
            try:
                await runner.wait_for(await store.last_position(), timeout=5)
                error = None
            except Exception as exc:
                error = exc
        if _judge(first, [], error, False):
            problems.append(f"{first.corrupt.name} | a running ProjectionRunner: {error!r:.300}")
    return problems


def _place(backend: str, url: str, catalogue: list[Corrupt], first: int) -> list[Placed]:
    """Write the catalogue's rows around tidings, each in a stream of its own."""
    rows = [_row(c, n, backend) for n, c in enumerate(catalogue, first)]
    if backend == "sqlite":
        positions = _insert_sqlite(_sqlite_path(url), rows)
    else:
        schema = dict(parse_qsl(urlsplit(url).query))["schema"]
        positions = asyncio.run(_insert_postgres(schema, rows))
    placed = []
    for corrupt, position, row in zip(catalogue, positions, rows, strict=True):
        stream_id = row["stream_id"]  # SQLite hands a BLOB back as bytes
        if backend == "postgres":  # bytea: the store reads UTF-8 as text
            stream_id = stream_id.decode() if stream_id.isascii() else None
        placed.append(Placed(corrupt, position, stream_id))
    return placed


def _changed(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Tables whose row counts moved (the runners' checkpoints are expected new rows)."""
    moved = {
        name: (before.get(name), after.get(name))
        for name in set(before) | set(after)
        if before.get(name) != after.get(name) and name != "tidings_projections"
    }
    return [f"tables changed: {moved}"] if moved else []


def _check_cli(url: str, placed: list[Placed]) -> list[str]:
    """`tidings tail` and `tidings events` (which read with keep_unknown) on every row."""
    problems: list[str] = []
    runner = CliRunner(env={"COLUMNS": "200", "TIDINGS_STORE": None})
    for p in placed:
        commands = [
            ["tail", "--after", str(p.position - 1), "--limit", "1"],
            ["tail", "--after", str(p.position - 1), "--limit", "1", "--json"],
        ]
        if p.addressable and p.corrupt.outcome != UNREADABLE:
            commands.append(["events", p.stream_id, "--json"])
        for command in commands:
            result = runner.invoke(cli, [*command, "--store", url])
            shown = p.corrupt.outcome == UNKNOWN
            if shown:
                ok = result.exit_code == 0 and p.corrupt.columns.get("type", "hostile.item") in (
                    result.stdout
                )
            else:
                expected = (
                    p.corrupt.detail
                    if p.corrupt.outcome == UNREADABLE
                    else f"position {p.position}"
                )
                ok = (
                    result.exit_code == 2
                    and result.stderr.startswith("error: ")
                    and expected in result.stderr
                )
            if not ok or "Traceback" in result.output:
                problems.append(
                    f"{p.corrupt.name} | tidings {command[0]}: exit "
                    f"{result.exit_code}, {result.output[-300:]!r}, {result.exception!r}"
                )
    # a stream id that is not text fails `tidings streams` with its name, not a traceback
    if any(not p.addressable for p in placed):
        result = runner.invoke(cli, ["streams", "--store", url])
        if result.exit_code != 2 or "xff" not in result.stderr:
            problems.append(f"- | tidings streams: {result.exit_code} {result.output[-300:]!r}")
    return problems


async def _append_valid(url: str, start: int, count: int) -> list[int]:
    positions = []
    async with open_store(url) as store:
        for n in range(start, start + count):
            result = await store.append(f"valid-{n % 4}", [Item(n=n)])
            positions.append(result.position)
    return positions


async def _valid_back(url: str, count: int) -> tuple[int, list[str]]:
    """How many valid events read back intact (by their streams), and any problem."""
    problems = []
    found: Counter[int] = Counter()
    async with open_store(url) as store:
        for stream in range(4):
            records, error = await attempt(
                lambda stream=stream: store.read_stream(f"valid-{stream}"), limit=10**9
            )
            if error is not None:
                problems.append(f"valid-{stream}: {error!r}")
            found.update(r.event.n for r in records)
        versions = [await store.stream_version(f"valid-{s}") for s in range(4)]
    if sum(versions) != count:
        problems.append(f"stream versions {versions} do not add up to {count}")
    intact = sum(1 for n in range(count) if found[n] == 1)
    return intact, problems


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_corrupt_stored_rows_are_refused_naming_their_place(backend: str, tmp_path: Path) -> None:
    require(backend)
    url = store_url(backend, tmp_path)
    catalogue = SQLITE_CORRUPT if backend == "sqlite" else POSTGRES_CORRUPT
    valid = scale(40, 400)
    problems: list[str] = []
    try:
        with stopwatch() as took:
            asyncio.run(_append_valid(url, 0, valid // 2))
            # Rows the driver cannot read fail every fetch that meets them: they go in last,
            # once the others were read on their own.
            readable = [c for c in catalogue if c.outcome != UNREADABLE]
            placed = _place(backend, url, readable, 0)
            later = asyncio.run(_append_valid(url, valid // 2, valid - valid // 2))
            if min(later) <= max(p.position for p in placed):
                problems.append(f"positions went back after the corrupt rows: {later[:3]}")
            before = asyncio.run(_tables(backend, url))
            problems += asyncio.run(_check_reads(url, placed))
            problems += _changed(before, asyncio.run(_tables(backend, url)))
            unreadable = [c for c in catalogue if c.outcome == UNREADABLE]
            if unreadable:
                more = _place(backend, url, unreadable, len(readable))
                before = asyncio.run(_tables(backend, url))
                problems += asyncio.run(_check_reads(url, more))
                placed += more
            problems += _check_cli(url, placed)
            intact, found = asyncio.run(_valid_back(url, valid))
            problems += found
            problems += _changed(before, asyncio.run(_tables(backend, url)))
    finally:
        discard(url)
    for problem in problems:
        print("problem:", problem)
    failed = {problem.split(" | ")[0] for problem in problems}
    refused = sum(1 for c in catalogue if c.name not in failed)
    report(
        Row(
            scenario="Corrupt stored rows: every read path (reads, subscribe, projections, CLI)",
            backend="SQLite" if backend == "sqlite" else "PostgreSQL",
            load=f"{valid:,} valid events around {len(catalogue)} corrupt rows",
            faults=", ".join(c.name for c in catalogue),
            events_in=valid + len(catalogue),
            events_out=intact + refused,
            lost=(valid - intact) + (len(catalogue) - refused),
            duplicated=0,
            notes="each row: read_all, read_stream, subscribe (with and without keep_unknown), "
            "a ProjectionRunner (caught up and running), tidings tail/events; refused naming "
            "position and stream, or an UnknownEvent where asked",
            seconds=took[0],
        )
    )
    assert not problems, problems


# -- 1b. the row decoder, fuzzed ---------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
_NASTY_DATA = [
    "",
    "{",
    "null",
    "[" * 20_000,
    '{"n": ' + "9" * 5000 + "}",
    '{"n": 1e999}',
    '{"n": NaN}',
    '{"n": 1, "n": "x"}',
    '{"n": 1, "note": "\\ud800"}',
    '{"n": 1}',
    '{"n": 1, "note": "<script>"}',
]
_data = st.one_of(
    st.sampled_from(_NASTY_DATA),
    _json_values.map(json.dumps),
    st.fixed_dictionaries({"n": _json_values}, optional={"note": _json_values}).map(json.dumps),
    st.text(max_size=30),
    st.binary(max_size=30),
)
_metadata = st.one_of(
    st.none(),
    st.sampled_from(["", "{", "[1]", "null", '{"headers": []}', "[" * 20_000]),
    st.fixed_dictionaries(
        {},
        optional={
            "correlation_id": _json_values,
            "causation_id": _json_values,
            "headers": _json_values | st.dictionaries(st.text(max_size=5), _json_values),
        },
    ).map(json.dumps),
)
_INT64 = st.integers(-(2**63), 2**63 - 1)
_rows = st.tuples(
    st.integers(1, 2**63 - 1),
    st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=24), st.text(max_size=20)),
    st.one_of(st.text(max_size=20), st.binary(max_size=6), st.integers()),
    st.one_of(st.integers(0, 10**6), _INT64, st.text(max_size=4)),
    st.one_of(
        st.sampled_from(
            ["hostile.item", "os.system", "builtins.eval", "tidings.core.events.Event"]
        ),
        st.text(max_size=20),
    ),
    st.one_of(st.just(1), _INT64),
    st.one_of(st.integers(0, 2**52), _INT64, st.text(max_size=8), st.floats()),
    _data,
    _metadata,
)


def test_the_stored_row_decoder_is_fuzzed() -> None:
    from tidings.store.sqlite import _from_micros

    codecs = [JSONCodec(), JSONCodec(keep_unknown=True)]
    seen: Counter[str] = Counter()

    @settings(
        max_examples=scale(300, 6000),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(row=_rows)
    def decode(row: tuple[Any, ...]) -> None:
        for codec in codecs:
            seen["in"] += 1
            try:
                [record] = codec.iter_rows([row], id_of=uuid_from_bytes, time_of=_from_micros)
            except EventDecodeError as exc:
                assert exc.position == row[0] and f"position {row[0]}" in str(exc)
                seen["refused"] += 1
                continue
            assert isinstance(record.event, Item | UnknownEvent)
            assert isinstance(record.stream_id, str) and isinstance(record.version, int)
            assert record.id.int < 2**128 and record.recorded_at.tzinfo is not None
            seen["decoded"] += 1

    with stopwatch() as took:
        decode()
    report(
        Row(
            scenario="Stored-row decoder fuzzed (hypothesis): JSONCodec.iter_rows",
            backend="core (SQLite's id and time columns)",
            load=f"{seen['in']:,} generated rows, with and without keep_unknown",
            faults="any id bytes or text, stream ids, versions, types, schema versions, times, "
            "data and metadata (nested 20,000 deep, 5,000 digits, NaN, not UTF-8)",
            **_fuzz_counts(seen),
            notes=f"{seen['refused']:,} refused naming the row, {seen['decoded']:,} decoded",
            seconds=took[0],
        )
    )


class _Counts(TypedDict):
    events_in: int
    events_out: int
    lost: int
    duplicated: int


def _fuzz_counts(seen: Counter[str]) -> _Counts:
    """A fuzzing row's counts: every input must end refused (with a tidings error) or
    decoded; anything else counts as lost."""
    out = seen["refused"] + seen["decoded"]
    return {"events_in": seen["in"], "events_out": out, "lost": seen["in"] - out, "duplicated": 0}


# -- 1c. the CLI's own inputs, fuzzed ---------------------------------------------------------

SQL_SAMPLE = ["'; DROP TABLE tidings_events; --", "' OR '1'='1", "<script>alert(1)</script>"]
_HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "-", "--", "--json", "-1", "9" * 30, "\x00", "nul\x00byte", *SQL_SAMPLE]),
)


def test_cli_arguments_are_fuzzed(tmp_path: Path) -> None:
    """Stream ids, positions, correlation ids, dead-letter ids and store URLs from
    hypothesis: every command ends with exit 0, 1 or 2 and never a traceback."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    asyncio.run(_append_valid(url, 0, 8))
    runner = CliRunner(env={"COLUMNS": "200", "TIDINGS_STORE": None, "TIDINGS_BROKER": None})
    seen: Counter[str] = Counter()

    @settings(max_examples=scale(60, 1500), deadline=None)
    @given(
        command=st.one_of(
            st.tuples(st.just("events"), _HOSTILE_TEXT),
            st.tuples(st.just("events"), _HOSTILE_TEXT, st.just("--json")),
            st.tuples(st.just("tail"), st.just("--after"), _HOSTILE_TEXT),
            st.tuples(st.just("tail"), st.just("--limit"), _HOSTILE_TEXT, st.just("--json")),
            st.tuples(st.just("trace"), _HOSTILE_TEXT),
            st.tuples(
                st.just("streams"), st.just("--store"), _HOSTILE_TEXT.map("sqlite:///{}".format)
            ),
            st.tuples(st.just("streams"), st.just("--store"), _HOSTILE_TEXT),
            st.tuples(st.just("dlq"), st.just("show"), _HOSTILE_TEXT),
            st.tuples(st.just("dlq"), st.just("list"), st.just("--topic"), _HOSTILE_TEXT),
            st.tuples(st.just("projections"), st.just("rebuild"), _HOSTILE_TEXT),
        )
    )
    def run(command: tuple[str, ...]) -> None:
        seen["in"] += 1
        args = list(command)
        if "--store" not in args and args[0] not in ("dlq",):
            args += ["--store", url]
        if args[0] == "dlq":
            args += ["--broker", "memory://"]
        result = runner.invoke(cli, args)
        ok = result.exit_code in (0, 1, 2) and "Traceback" not in result.output
        ok = ok and (result.exception is None or isinstance(result.exception, SystemExit))
        assert ok, (args, result.exit_code, result.output[-500:], result.exception)
        seen["answered"] += 1

    with stopwatch() as took:
        run()
    report(
        Row(
            scenario="CLI arguments fuzzed (hypothesis): events, tail, trace, streams, dlq, "
            "projections",
            backend="the tidings command on SQLite and the memory broker",
            load=f"{seen['in']:,} generated command lines",
            faults="any text as stream ids, positions, limits, correlation ids, dead-letter "
            "ids, projection names and store URLs (NUL, SQL, 30 digits, options as values)",
            events_in=seen["in"],
            events_out=seen["answered"],
            lost=seen["in"] - seen["answered"],
            duplicated=0,
            notes="every command answered with exit 0, 1 or 2 (one error line), no traceback",
            seconds=took[0],
        )
    )


# -- 2. CloudEvents on the wire ------------------------------------------------------------------

_ATTRIBUTES = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "schemaversion",
    "streamversion",
    "position",
    "correlationid",
    "causationid",
    "tidingsheaders",
    "partitionkey",
    "traceparent",
    "data",
    "data_base64",
]
_NASTY_VALUES = [
    "",
    "1.0",
    "0.3",
    "\u00b2",  # a digit to str.isdigit, not to int()
    "1" * 5000,
    "-1",
    "9" * 19,
    "9" * 30,
    "hostile.item",
    "os.system",
    "builtins.eval",
    FIXED_ID,
    "2024-05-06T07:08:09Z",
    "yesterday",
    "%ZZ",
    "%ff%fe",
    "%00",
    "[" * 5000,
    '{"a": 1}',
    '{"a": "b"}',
    "[1, 2]",
    "null",
    "<script>alert(1)</script>",
    "'; drop table tidings_events; --",
    "\u202e",
]
_NASTY_BODIES = [
    b"",
    b"{",
    b"plain text",
    b"\xff\xfe\x00",
    b"[" * 20_000,
    b'{"n": 1}',
    b'{"n": "x"}',
    b'{"n": ' + b"9" * 5000 + b"}",
    b'{"specversion": "1.0"}',
    b'{"specversion": "1.0", "id": "' + FIXED_ID.encode() + b'", "source": "s", "type": "x"}',
    b'{"a": ' * 5_000,
]
_value = st.one_of(st.sampled_from(_NASTY_VALUES), st.text(max_size=24))
_name = st.one_of(st.sampled_from(_ATTRIBUTES), st.text("abcdefxyz0189_-", max_size=10))
_body = st.one_of(
    st.integers().map(lambda n: json.dumps({"n": n}).encode()),
    st.sampled_from(_NASTY_BODIES),
    st.binary(max_size=48),
    st.fixed_dictionaries({"n": _json_values}, optional={"note": _json_values}).map(
        lambda d: json.dumps(d).encode()
    ),
)
_document = st.builds(
    lambda core, extra, data: {**extra, **core, **data},
    st.fixed_dictionaries(
        {},
        optional={
            "specversion": st.sampled_from(["1.0", "0.3"]) | _json_values,
            "id": st.sampled_from([FIXED_ID, "x"]) | _json_values,
            "source": st.just("s") | _json_values,
            "type": st.sampled_from(["hostile.item", "os.system"]) | _json_values,
            "time": st.sampled_from(["2024-05-06T07:08:09Z", "1e999"]) | _json_values,
            "schemaversion": st.sampled_from([1, 1e999, "\u00b2"]) | _json_values,
            "position": _json_values,
            "streamversion": _json_values,
            "subject": _json_values,
            "partitionkey": _json_values,
            "correlationid": _json_values,
            "tidingsheaders": st.sampled_from(["{", "[" * 5000, '{"a": 1}', "[]"]) | _json_values,
        },
    ),
    st.dictionaries(st.text(max_size=8), _json_values, max_size=3),
    st.fixed_dictionaries(
        {},
        optional={
            "data": st.fixed_dictionaries({"n": _json_values}) | _json_values,
            "data_base64": st.sampled_from(["!!", "eyJuIjogMX0="]) | _json_values,
        },
    ),
)


def _structured_bytes(document: dict[str, Any]) -> bytes:
    return json.dumps(document, default=str).encode()


_VALID_CORE = {"specversion": "1.0", "id": FIXED_ID, "source": "s", "type": "hostile.item"}
_near_valid = st.builds(  # a valid event with a few attributes changed, or none
    lambda changed, data: {**_VALID_CORE, **changed, "data": data},
    st.dictionaries(_name, _json_values | _value, max_size=2),
    st.fixed_dictionaries({"n": st.integers()}, optional={"note": _json_values}) | _json_values,
)
_structured = st.one_of(
    st.sampled_from(_NASTY_BODIES),
    st.binary(max_size=48),
    _document.map(_structured_bytes),
    _near_valid.map(_structured_bytes),
)
_amqp_value = st.one_of(
    _value,
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.binary(max_size=12),
    st.floats(),
    st.datetimes(),
    st.none(),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
)


@dataclass
class _FakeNATS:
    headers: dict[str, str] | None
    data: bytes


@dataclass
class _FakeAMQP:
    headers: dict[str, Any]
    content_type: str | None
    body: bytes


def _replays(message: Message) -> None:
    """Re-encode a message as each adapter does to replay its dead letter (may refuse with a
    tidings error, never with anything else)."""
    from tidings.brokers import kafka, nats, redis

    for encode in (
        lambda: nats._wire(message, "ce-"),
        lambda: redis._fields(message),
        lambda: kafka.to_record(message),
        lambda: _adapters()["rabbitmq"]._amqp(message),  # type: ignore[attr-defined]
    ):
        try:
            encode()
        except TidingsError:
            pass


_ADAPTERS: dict[str, BrokerBase] = {}


def _adapters() -> dict[str, BrokerBase]:
    """Each adapter, built but never opened: their decoders are pure functions of a message."""
    if not _ADAPTERS:
        for name, url in {
            "nats": "nats://127.0.0.1:4222",
            "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
            "redis": "redis://127.0.0.1:6379/0",
            "sqs": "sqs://?region=us-east-1",
        }.items():
            _ADAPTERS[name] = open_broker(url)
    return _ADAPTERS


_CODECS = [JSONCodec(), JSONCodec(keep_unknown=True)]


def _judge_message(message: Message, seen: Counter[str]) -> None:
    """What every consumer does with a received message, none of which may fail but with a
    tidings error: decode it (a Service dead-letters on that error), keep it as a dead letter
    as each adapter stores one, and re-encode it for a replay."""
    assert message.key is None or isinstance(message.key, str), message.key
    refused = False
    for codec in _CODECS:
        try:
            record = message.record(codec)
        except TidingsError as exc:
            assert str(exc)
            refused = True
            continue
        assert isinstance(record.event, Item | UnknownEvent)
        assert isinstance(record.stream_id, str) and record.recorded_at.tzinfo is not None
    seen["refused" if refused else "decoded"] += 1
    dead = DeadLetter("d-1", message.topic, "g", "why", 1, NOW, message)
    record_json = dead.to_dict()
    json.dumps(record_json)  # Redis keeps it so, without default=str
    kept = DeadLetter.from_dict(json.loads(json.dumps(record_json, default=str)))
    assert kept.message.data == message.data
    _replays(message)


def test_binary_mode_cloudevents_are_fuzzed_through_every_adapter_decoder() -> None:
    """NATS (`ce-` headers, percent-encoded), HTTP-style (`Message.from_binary`), RabbitMQ
    (`cloudEvents_` AMQP headers of any AMQP type), Kafka (`ce_` byte headers)."""
    from tidings.brokers.kafka import from_record

    seen: Counter[str] = Counter()
    adapters = _adapters()

    @settings(
        max_examples=scale(400, 8000),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        binding=st.sampled_from(["nats", "http", "rabbitmq", "kafka"]),
        attributes=st.dictionaries(_name, _value, max_size=8)
        | st.builds(lambda changed: {**_VALID_CORE, **changed}, st.dictionaries(_name, _value)),
        amqp=st.dictionaries(_name, _amqp_value, max_size=6),
        content_type=st.one_of(st.none(), st.sampled_from(["application/json", "text/plain"])),
        key=st.one_of(st.none(), st.binary(max_size=8)),
        body=_body,
    )
    def decode(
        binding: str,
        attributes: dict[str, str],
        amqp: dict[str, Any],
        content_type: str | None,
        key: bytes | None,
        body: bytes,
    ) -> None:
        seen["in"] += 1
        if binding == "nats":
            headers = {f"ce-{k}": v for k, v in attributes.items()}
            if content_type:
                headers["content-type"] = content_type
            if key is not None:
                headers["Tidings-Key"] = key.decode("latin-1")
            nats_broker: Any = adapters["nats"]
            message = nats_broker._decode("t", _FakeNATS(headers, body))
        elif binding == "http":
            headers = {f"ce-{k}": v for k, v in attributes.items()}
            try:
                message = Message.from_binary("t", headers, body, prefix="ce-")
            except InvalidCloudEvent:
                message = Message("t", {}, body, None, headers)  # as the adapters keep it
        elif binding == "rabbitmq":
            properties = {f"cloudEvents_{k}": v for k, v in {**attributes, **amqp}.items()}
            rabbit: Any = adapters["rabbitmq"]
            message = rabbit._decode("t", _FakeAMQP(properties, content_type, body))
        else:
            record_headers = [(f"ce_{k}", v.encode()) for k, v in attributes.items()]
            message = from_record("t", key, body, record_headers)
        _judge_message(message, seen)

    with stopwatch() as took:
        decode()
    report(
        Row(
            scenario="CloudEvents binary mode fuzzed (hypothesis) through each adapter's decoder",
            backend="NATS/HTTP ce-, RabbitMQ cloudEvents_, Kafka ce_ (decoders, no server)",
            load=f"{seen['in']:,} generated messages",
            faults="any attribute names and values (5,000 digits, '²', %-escapes, nested 5,000 "
            "deep), AMQP values of every type, keys not UTF-8, any body",
            **_fuzz_counts(seen),
            notes=f"{seen['refused']:,} refused with a tidings error (dead-lettered by a "
            f"Service), {seen['decoded']:,} decoded; every one kept as a dead letter and "
            "re-encoded for a replay",
            seconds=took[0],
        )
    )


def test_structured_mode_cloudevents_are_fuzzed_through_every_adapter_decoder() -> None:
    """Redis (the `ce` field, any other fields, a key not UTF-8), SQS (the body), EventBridge
    (the body inside its envelope), and `Message.from_structured`."""
    seen: Counter[str] = Counter()
    adapters = _adapters()

    @settings(
        max_examples=scale(400, 8000),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        binding=st.sampled_from(["redis", "sqs", "eventbridge", "plain"]),
        body=_structured,
        key=st.one_of(st.none(), st.binary(max_size=8)),
        extra=st.dictionaries(st.binary(max_size=4), st.binary(max_size=8), max_size=2),
    )
    def decode(binding: str, body: bytes, key: bytes | None, extra: dict[bytes, bytes]) -> None:
        seen["in"] += 1
        if binding == "redis":
            fields = {**extra, b"ce": body}
            if key is not None:
                fields[b"k"] = key
            redis_broker: Any = adapters["redis"]
            message = redis_broker._message("t", fields)
            if extra:
                message = redis_broker._message("t", extra)  # no `ce` at all
        elif binding in ("sqs", "eventbridge"):
            text = body.decode("utf-8", "replace")
            if binding == "eventbridge":
                try:
                    text = json.dumps({"detail-type": "x", "detail": json.loads(text)})
                except (ValueError, RecursionError):
                    pass
            raw: dict[str, Any] = {"Body": text}
            if key is not None:
                raw["MessageAttributes"] = {"tidings-key": {"StringValue": key.decode("latin-1")}}
            sqs_broker: Any = adapters["sqs"]
            message = sqs_broker._decode("t", raw)
        else:
            try:
                message = Message.from_structured("t", body)
            except InvalidCloudEvent:
                message = Message("t", {}, body)
        _judge_message(message, seen)

    with stopwatch() as took:
        decode()
    report(
        Row(
            scenario="CloudEvents structured mode fuzzed (hypothesis) through each decoder",
            backend="Redis, SQS, EventBridge, plain JSON (decoders, no server)",
            load=f"{seen['in']:,} generated messages",
            faults="any JSON documents (attributes of every JSON type, 1e999, NaN, nested "
            "20,000 deep), bytes that are no JSON, foreign fields, keys not UTF-8",
            **_fuzz_counts(seen),
            notes=f"{seen['refused']:,} refused with a tidings error, {seen['decoded']:,} "
            "decoded; every one kept as a dead letter and re-encoded for a replay",
            seconds=took[0],
        )
    )


# -- 2b. hostile messages on real brokers, to a running Service ---------------------------------

_DROP = object()


def _doc(**attributes: Any) -> dict[str, Any]:
    """A structured CloudEvent of a valid `Item`, changed by `attributes` (`_DROP` drops)."""
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "hostile",
        "type": "hostile.item",
        "datacontenttype": "application/json",
        "data": {"n": -1},
    }
    document.update(attributes)
    return {k: v for k, v in document.items() if v is not _DROP}


def _raw_doc(placeholder: str, text: str, **attributes: Any) -> bytes:
    """A structured CloudEvent whose attribute `placeholder` is the raw JSON `text`."""
    return json.dumps(_doc(**{placeholder: "@@"}, **attributes)).replace('"@@"', text).encode()


def _structured_catalogue() -> list[tuple[str, bytes]]:
    encode = _structured_bytes
    return [
        ("not JSON", b"plain text"),
        ("not UTF-8", b"\xff\xfe\x00 not utf-8"),
        ("a JSON array", b"[1, 2]"),
        ("nested 100,000 deep", b"[" * 100_000),
        ("an object nested 50,000 deep", b'{"a": ' * 50_000),
        ("no specversion", encode(_doc(specversion=_DROP))),
        ("specversion 0.3", encode(_doc(specversion="0.3"))),
        ("id not a UUID", encode(_doc(id="not-a-uuid"))),
        ("an id of 10,000 characters", encode(_doc(id="x" * 10_000))),
        ("no type", encode(_doc(type=_DROP))),
        ("time not a time", encode(_doc(time="yesterday"))),
        ("schemaversion 1e999", _raw_doc("schemaversion", "1e999")),
        ("position NaN", _raw_doc("position", "NaN")),
        ("position of 5,000 digits", _raw_doc("position", "1" * 5000)),
        ("schemaversion '\u00b2'", encode(_doc(schemaversion="\u00b2"))),
        ("tidingsheaders nested 100,000 deep", encode(_doc(tidingsheaders="[" * 100_000))),
        ("tidingsheaders not text", encode(_doc(tidingsheaders='{"a": 1}'))),
        ("partitionkey a list", encode(_doc(partitionkey=[1, 2], data={"n": "x"}))),
        ("data_base64 not base64", encode(_doc(data=_DROP, data_base64="!!"))),
        ("binary data_base64", encode(_doc(data=_DROP, data_base64="AAE="))),
        ("data of the wrong types", encode(_doc(data={"n": "many"}))),
        ("data a string nested 100,000 deep", encode(_doc(data="[" * 100_000))),
        ("type os.system", encode(_doc(type="os.system"))),
        ("type builtins.eval", encode(_doc(type="builtins.eval"))),
        ("type __import__", encode(_doc(type="__import__"))),
        ("type a class path", encode(_doc(type="tidings.core.events.Event"))),
        ("type not text", encode(_doc(type={"a": 1}))),
        (
            "markup everywhere",
            encode(_doc(type="<script>alert(1)</script>", source="<img src=x onerror=alert(1)>")),
        ),
    ]


def _binary_base(**attributes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "hostile",
        "type": "hostile.item",
    }
    base.update(attributes)
    return {k: v for k, v in base.items() if v is not _DROP}


def _binary_catalogue() -> list[tuple[str, dict[str, Any], bytes]]:
    good = b'{"n": -1}'
    return [
        ("no attributes, plain text", {}, b"plain text"),
        ("no attributes, a JSON object", {}, b'{"n": 1}'),
        ("specversion 0.3", _binary_base(specversion="0.3"), good),
        ("id not a UUID", _binary_base(id="not-a-uuid"), good),
        ("position '\u00b2'", _binary_base(position="\u00b2"), good),
        ("position of 5,000 digits", _binary_base(position="1" * 5000), good),
        ("schemaversion -1", _binary_base(schemaversion="-1"), good),
        ("time not a time", _binary_base(time="yesterday"), good),
        ("tidingsheaders nested 5,000 deep", _binary_base(tidingsheaders="[" * 5000), good),
        ("tidingsheaders not JSON", _binary_base(tidingsheaders="{"), good),
        ("type os.system", _binary_base(type="os.system"), good),
        ("type builtins.eval", _binary_base(type="builtins.eval"), good),
        ("body not JSON", _binary_base(), b"not json"),
        ("body of the wrong types", _binary_base(), b'{"n": "x"}'),
        ("body nested 100,000 deep", _binary_base(), b"[" * 100_000),
        ("body not UTF-8", _binary_base(), b"\xff\xfe"),
        ("percent escapes", _binary_base(source="%ZZ%ff", type="%6Fs.system"), good),
    ]


def _random_hostile(rng: random.Random, count: int) -> list[tuple[str, Any]]:
    """Seeded random junk: bytes, documents of an unknown type, attributes of random text."""

    def text() -> str:
        return "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF)]))
            for _ in range(rng.randint(0, 12))
        )

    out: list[tuple[str, Any]] = []
    for number in range(count):
        kind = number % 3
        if kind == 0:
            out.append(("random bytes", rng.randbytes(rng.randint(0, 64))))
        elif kind == 1:
            extra = {text() or "x": rng.choice([text(), rng.random(), None, [1]]) for _ in range(3)}
            document = _doc(type=rng.choice(["hostile.unknown", "os.system", text() or "?"]))
            out.append(("random document", _structured_bytes({**extra, **document})))
        else:
            attributes = _binary_base(
                type=rng.choice(["hostile.unknown", "os.system"]),
                **{rng.choice(_ATTRIBUTES[4:16]): text() for _ in range(3)},
            )
            out.append(("random attributes", (attributes, rng.randbytes(rng.randint(0, 32)))))
    return out


_DEAD_LETTER_REASONS = ("InvalidCloudEvent: ", "EventDecodeError: ", "UnknownEventType: ")
_SKIPPED = object()


def _sampled(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` examples of a hypothesis strategy (the same ones every run), to send through
    a real broker."""
    found: list[Any] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Any) -> None:
        found.append(value)

    collect()
    return found[:count]


def _verdict(body: bytes) -> Any:
    """What a `Service` typed `Item` does with a structured message: handles it (the item's
    number), dead-letters it (None), or acks it as another handler's business (`_SKIPPED`)."""
    try:
        record = Message.from_structured("t", body).record(JSONCodec())
    except TidingsError:
        return None
    return record.event.n if isinstance(record.event, Item) else _SKIPPED


def enabled(backend: str) -> None:
    """Skip a broker left out of `TIDINGS_TEST_BROKERS`; `require` its running server."""
    if backend not in BROKER_BACKENDS:
        pytest.skip(f"{backend} is not in TIDINGS_TEST_BROKERS ({','.join(BROKER_BACKENDS)})")
    require(backend)


class _Raw:
    """Publishes bytes on a broker's topic as a foreign producer would, with the plain
    client, where the adapter's module docstring says a keyless message lives."""

    def __init__(self, backend: str, broker: BrokerBase, topic: str) -> None:
        self.backend, self.broker, self.topic = backend, broker, topic
        self.client: Any = None
        self.js: Any = None
        self.channel: Any = None

    async def __aenter__(self) -> _Raw:
        if self.backend == "redis":
            import redis.asyncio as aioredis

            self.client = aioredis.Redis.from_url(REDIS)
        elif self.backend == "nats":
            import nats

            self.client = await nats.connect(NATS)
            self.js = self.client.jetstream()
        elif self.backend == "rabbitmq":
            import aio_pika

            self.client = await aio_pika.connect(RABBITMQ)
            self.channel = await self.client.channel()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.backend == "redis":
            keys = [k async for k in self.client.scan_iter(match=f"tidings:{self.topic}:*")]
            if keys:
                await self.client.delete(*keys)
            await self.client.aclose()
        elif self.client is not None:
            await self.client.close()

    async def structured(self, body: bytes, fields: dict[Any, Any] | None = None) -> None:
        if self.backend == "redis":
            await self.client.xadd(f"tidings:{self.topic}:any", fields or {"ce": body})
        elif self.backend == "nats":
            await self.js.publish(f"tidings.{self.topic}.any._", body)
        elif self.backend == "rabbitmq":
            await self._amqp({}, None, body)
        else:
            try:
                message = Message.from_structured(self.topic, body)
            except InvalidCloudEvent:
                message = Message(self.topic, {}, body)
            await self.broker.publish_message(message)

    async def binary(
        self, attributes: Mapping[str, Any], body: bytes, extra: Mapping[str, Any] = {}
    ) -> None:
        if self.backend == "redis":  # no headers: the attributes go into a structured body
            document = {**attributes, "data": body.decode("utf-8", "replace")}
            await self.structured(_structured_bytes(document))
        elif self.backend == "nats":
            headers = {f"ce-{k}": str(v) for k, v in attributes.items()} | dict(extra)
            if attributes:
                headers["content-type"] = "application/json"
            await self.js.publish(f"tidings.{self.topic}.any._", body, headers=headers or None)
        elif self.backend == "rabbitmq":
            headers = {f"cloudEvents_{k}": v for k, v in attributes.items()} | dict(extra)
            await self._amqp(headers, "application/json" if attributes else None, body)
        else:
            headers = {f"ce-{k}": str(v) for k, v in attributes.items()}
            try:
                message = Message.from_binary(self.topic, headers, body, prefix="ce-")
            except InvalidCloudEvent:
                message = Message(self.topic, {}, body, None, headers)
            await self.broker.publish_message(message)

    async def _amqp(self, headers: dict[str, Any], content_type: str | None, body: bytes) -> None:
        import aio_pika

        exchange = await self.channel.get_exchange(f"tidings:{self.topic}")
        message = aio_pika.Message(body, headers=headers, content_type=content_type)
        await exchange.publish(message, routing_key="any")


async def _consume(
    broker: BrokerBase,
    topic: str,
    group: str,
    feed: Callable[[], Awaitable[None]],
    *,
    valid: int,
    hostile: int,
    timeout: float = 90,
    kinds: tuple[type[Event], ...] = (Item,),
    registry: TypeRegistry | None = None,
) -> tuple[Counter[Any], list[DeadLetter], float]:
    """Run a `Service` with a handler for each of `kinds` on `topic` while `feed` publishes;
    wait until `valid` events were handled and `hostile` messages dead-lettered (then a
    little longer, to see any duplicate). Returns the events seen (by `_identity`), the
    group's dead letters and the seconds taken."""
    service = tidings.Service(group, broker, registry=registry)
    seen: Counter[Any] = Counter()

    async def handle(event: Event, ctx: tidings.Context) -> None:
        seen[_identity(event, ctx)] += 1

    for kind in kinds:
        service.handler(topic, event=kind)(handle)

    await broker.declare(topic, group)
    started = time.perf_counter()
    running = asyncio.create_task(service.run())
    letters: list[DeadLetter] = []
    try:
        await feed()
        async with asyncio.timeout(timeout):
            while True:
                if running.done():
                    running.result()
                    raise AssertionError("the service stopped by itself")
                letters = [d for d in await broker.dead_letters(topic) if d.group == group]
                if sum(seen.values()) >= valid and len(letters) >= hostile:
                    break
                await asyncio.sleep(0.25)
        took = time.perf_counter() - started
        await asyncio.sleep(0.5)  # anything delivered twice shows now
        letters = [d for d in await broker.dead_letters(topic) if d.group == group]
    except TimeoutError:
        raise AssertionError(
            f"after {timeout} s: {sum(seen.values())} of {valid} valid handled, "
            f"{len(letters)} of {hostile} dead-lettered"
        ) from None
    finally:
        service.stop()
        async with asyncio.timeout(20):
            await asyncio.gather(running, return_exceptions=True)
    return seen, letters, took


def _identity(event: Event, ctx: tidings.Context) -> Any:
    """What a handler saw of an event: an `Item`'s number; else its type, the size of its
    data and the number of its metadata headers."""
    if isinstance(event, Item):
        return event.n
    if isinstance(event, Amount):
        return ("amount", event.cents)
    size = len(event.model_dump_json())
    return (event.__event_type__, size, len(ctx.delivery.metadata.headers))


async def _drop_dead_letters(broker: BrokerBase, letters: list[DeadLetter]) -> None:
    """Leave the shared dead-letter stores as found (RabbitMQ's expire by themselves)."""
    if broker.__class__.__name__ in ("RedisBroker", "NATSBroker"):
        for letter in letters:
            with contextlib.suppress(TidingsError):
                await broker._drop_dead_letter(letter.id)


@pytest.mark.parametrize("backend", ["memory", "redis", "nats", "rabbitmq"])
async def test_hostile_messages_on_the_wire_are_dead_lettered_and_the_consumer_goes_on(
    backend: str,
) -> None:
    enabled(backend)
    rng = random.Random(f"hostile-{backend}")
    topic, group = unique("hostile"), unique("g")
    valid = scale(10, 100)
    structured = _structured_catalogue()
    binary = _binary_catalogue()
    randoms = _random_hostile(rng, scale(6, 240))
    extras: list[tuple[str, Callable[[_Raw], Awaitable[None]]]] = []
    if backend == "redis":
        extras += [
            ("an entry without `ce`", lambda raw: raw.structured(b"", {"text": "hello"})),
            (
                "a key not UTF-8",
                lambda raw: raw.structured(
                    b"", {"ce": _structured_bytes(_doc(type="os.system")), "k": b"\xff\xfe"}
                ),
            ),
        ]
    if backend == "rabbitmq":
        good = b'{"n": -1}'
        extras += [
            (f"AMQP {name}", lambda raw, e=value: raw.binary(_binary_base(), good, e))
            for name, value in [
                ("time 2**62 ms", {"cloudEvents_time": 2**62}),
                ("id as bytes", {"cloudEvents_id": bytearray(b"\xff")}),
                ("type a table", {"cloudEvents_type": {"nested": 1}}),
                ("specversion a bool", {"cloudEvents_specversion": True}),
                ("position a float", {"cloudEvents_position": 1.5}),
            ]
        ]
    if backend == "nats":
        extras.append(
            (
                "a key header of %-junk",
                lambda raw: raw.binary(
                    _binary_base(type="os.system"), b'{"n": -1}', {"Tidings-Key": "%ff%fe"}
                ),
            )
        )
    # and examples of the fuzz tests' structured strategy: some are valid events
    sampled: list[tuple[bytes, int | None]] = []
    for body in _sampled(_structured, scale(12, 300)):
        verdict = _verdict(body)
        if verdict is not _SKIPPED:
            sampled.append((body, verdict))  # type: ignore[arg-type]
    expected: Counter[Any] = Counter(range(valid))
    expected.update(n for _, n in sampled if n is not None)
    hostile = len(structured) + len(binary) + len(randoms) + len(extras)
    hostile += sum(1 for _, n in sampled if n is None)
    async with open_broker(broker_url(backend)) as broker:
        async with _Raw(backend, broker, topic) as raw:

            async def feed() -> None:
                senders: list[Callable[[], Awaitable[None]]] = []
                senders += [lambda b=body: raw.structured(b) for _, body in structured]
                senders += [lambda a=a, b=b: raw.binary(a, b) for _, a, b in binary]
                senders += [lambda e=extra: e(raw) for _, extra in extras]
                senders += [lambda b=body: raw.structured(b) for body, _ in sampled]
                for _, junk in randoms:
                    if isinstance(junk, bytes):
                        senders.append(lambda j=junk: raw.structured(j))
                    else:
                        senders.append(lambda j=junk: raw.binary(*j))
                rng.shuffle(senders)
                every = max(1, len(senders) // valid)
                sent = 0
                for number, send in enumerate(senders):
                    await send()
                    if number % every == 0 and sent < valid:
                        await broker.publish(topic, Item(n=sent))
                        sent += 1
                for n in range(sent, valid):
                    await broker.publish(topic, Item(n=n))

            with stopwatch() as took:
                seen, letters, recovered = await _consume(
                    broker, topic, group, feed, valid=sum(expected.values()), hostile=hostile
                )
        await _drop_dead_letters(broker, letters)
    unclear = [d.error for d in letters if not d.error.startswith(_DEAD_LETTER_REASONS)]
    assert not unclear, unclear
    handled = sum(min(seen[key], count) for key, count in expected.items())
    lost = sum(max(0, count - seen[key]) for key, count in expected.items())
    lost += max(0, hostile - len(letters))
    duplicated = sum(max(0, count - expected[key]) for key, count in seen.items())
    duplicated += max(0, len(letters) - hostile)
    valid_sampled = sum(1 for _, n in sampled if n is not None)
    report(
        Row(
            scenario="Hostile CloudEvents from a plain client, between valid ones, to a Service",
            backend={"memory": "memory", "redis": "Redis", "nats": "NATS JetStream"}.get(
                backend, "RabbitMQ"
            ),
            load=f"{valid} valid events interleaved with {hostile + valid_sampled} messages "
            "from a plain client",
            faults=f"{len(structured)} structured, {len(binary)} binary-mode, {len(extras)} "
            f"broker-specific, {len(randoms)} seeded random and {len(sampled)} hypothesis-"
            f"generated messages ({valid_sampled} of them valid events)",
            events_in=sum(expected.values()) + hostile,
            events_out=handled + min(len(letters), hostile),
            lost=lost,
            duplicated=duplicated,
            notes="every hostile message dead-lettered at once with its reason "
            f"({', '.join(sorted({d.error.split(':')[0] for d in letters}))}); the Service "
            f"never stopped; all handled in {recovered:.2f} s",
            seconds=took[0],
        )
    )


# -- 3. upcasters that fail ----------------------------------------------------------------------

UPCASTING = TypeRegistry()


class Amount(Event, type="hostile.amount", version=2, registry=UPCASTING):
    cents: int


class Raising(Event, type="hostile.raising", version=2, registry=UPCASTING):
    n: int


class NotADict(Event, type="hostile.notadict", version=2, registry=UPCASTING):
    n: int


class Recursing(Event, type="hostile.recursing", version=2, registry=UPCASTING):
    n: int


@upcaster("hostile.amount", from_version=1, registry=UPCASTING)
def _euros_to_cents(data: dict[str, Any]) -> dict[str, Any]:
    return {"cents": data["euros"] * 100}  # KeyError, TypeError... on hostile data


@upcaster("hostile.raising", from_version=1, registry=UPCASTING)
def _always_raises(data: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("this upcaster always fails")


@upcaster("hostile.notadict", from_version=1, registry=UPCASTING)
def _returns_a_list(data: dict[str, Any]) -> dict[str, Any]:
    return [data]  # type: ignore[return-value]


@upcaster("hostile.recursing", from_version=1, registry=UPCASTING)
def _recurses(data: dict[str, Any]) -> dict[str, Any]:
    return _recurses(data)


LOOPING = TypeRegistry()


class Looped(Event, type="hostile.loop", version=3, registry=LOOPING):
    n: int


@upcaster("hostile.loop", 1, to_type="hostile.loopback", to_version=1, registry=LOOPING)
def _there(data: dict[str, Any]) -> dict[str, Any]:
    return data


@upcaster("hostile.loopback", 1, to_type="hostile.loop", to_version=1, registry=LOOPING)
def _back(data: dict[str, Any]) -> dict[str, Any]:
    return data


def _old(type: str, **data: Any) -> UnknownEvent:
    """An event as an older release stored or published it: version 1 of `type`."""
    return UnknownEvent(type=type, version=1, data=data)


BAD_UPCASTS = [
    ("an upcaster that raises", lambda: _old("hostile.raising", n=1), "RuntimeError"),
    ("an upcaster returning a list", lambda: _old("hostile.notadict", n=1), "TypeError"),
    ("an upcaster recursing forever", lambda: _old("hostile.recursing", n=1), "RecursionError"),
    ("data the upcaster cannot read", lambda: _old("hostile.amount", eur=1), "KeyError"),
    ("data of a type it cannot use", lambda: _old("hostile.amount", euros=None), "TypeError"),
    ("data upcast to invalid data", lambda: _old("hostile.amount", euros="x"), "ValidationError"),
]


async def test_upcasters_that_fail_are_refused_or_dead_lettered(tmp_path: Path) -> None:
    valid = scale(10, 100)
    problems: list[str] = []
    counts: Counter[str] = Counter()
    with stopwatch() as took:
        # the store: old events read through the upcasters
        url = f"sqlite:///{tmp_path / 'upcasting.db'}"
        positions: dict[str, int] = {}
        async with open_store(url, codec=JSONCodec(keep_unknown=True)) as raw:
            for n in range(valid):
                await raw.append(f"amount-{n}", [_old("hostile.amount", euros=n)])
            for name, make, _ in BAD_UPCASTS:
                positions[name] = (await raw.append(f"bad-{len(positions)}", [make()])).position
        async with open_store(url, codec=JSONCodec(UPCASTING)) as store:
            for number, (name, _, reason) in enumerate(BAD_UPCASTS):
                counts["in"] += 1
                records, error = await attempt(lambda n=number: store.read_stream(f"bad-{n}"))
                if (
                    isinstance(error, EventDecodeError)
                    and error.position == positions[name]
                    and reason in str(error)
                ):
                    counts["refused"] += 1
                else:
                    problems.append(f"store, {name}: {records!r:.100} {error!r:.300}")
            for n in range(valid):
                counts["in"] += 1
                records, error = await attempt(lambda n=n: store.read_stream(f"amount-{n}"))
                if error is None and [r.event for r in records] == [Amount(cents=n * 100)]:
                    counts["valid"] += 1
                else:
                    problems.append(f"store, amount-{n}: {records!r:.100} {error!r:.300}")
        # brokers: a Service decoding with the upcasters
        for backend in ("memory", "redis"):
            if backend not in BROKER_BACKENDS:
                continue
            require(backend)
            topic, group = unique("upcast"), unique("g")
            async with open_broker(broker_url(backend)) as broker:

                async def feed(broker: BrokerBase = broker, topic: str = topic) -> None:
                    for n in range(valid):
                        await broker.publish(topic, _old("hostile.amount", euros=n))
                        if n < len(BAD_UPCASTS):
                            await broker.publish(topic, BAD_UPCASTS[n][1]())
                    for _, make, _ in BAD_UPCASTS[valid:]:
                        await broker.publish(topic, make())

                seen, letters, _ = await _consume(
                    broker,
                    topic,
                    group,
                    feed,
                    valid=valid,
                    hostile=len(BAD_UPCASTS),
                    kinds=(Amount,),
                    registry=UPCASTING,
                )
                await _drop_dead_letters(broker, letters)
                if backend == "redis":
                    import redis.asyncio as aioredis

                    client = aioredis.Redis.from_url(REDIS)
                    keys = [k async for k in client.scan_iter(match=f"tidings:{topic}:*")]
                    if keys:
                        await client.delete(*keys)
                    await client.aclose()
            counts["in"] += valid + len(BAD_UPCASTS)
            counts["valid"] += sum(1 for key in seen if seen[key] == 1)
            counts["duplicated"] += sum(c - 1 for c in seen.values())
            for letter in letters:
                if letter.error.startswith("EventDecodeError: ") and any(
                    reason in letter.error for _, _, reason in BAD_UPCASTS
                ):
                    counts["refused"] += 1
                else:
                    problems.append(f"{backend}: unclear dead letter {letter.error!r}")
        # the upcaster fed any data: its class, or a decode error naming the row
        codec = JSONCodec(UPCASTING)

        @settings(max_examples=scale(200, 3000), deadline=None)
        @given(data=st.dictionaries(st.sampled_from(["euros", "eur", "cents"]), _json_values))
        def upcast(data: dict[str, Any]) -> None:
            counts["in"] += 1
            row = (7, uuid.uuid4(), "s", 1, "hostile.amount", 1, NOW, json.dumps(data), None)
            try:
                [record] = codec.iter_rows([row])
            except EventDecodeError as exc:
                assert exc.position == 7
                counts["refused"] += 1
            else:
                assert isinstance(record.event, Amount)
                counts["valid"] += 1

        upcast()
        # a loop of upcasters: refused when a store or broker opens, and when decoding
        counts["in"] += 3
        with pytest.raises(EventDefinitionError, match="loop"):
            async with open_store(f"sqlite:///{tmp_path / 'loop.db'}", codec=JSONCodec(LOOPING)):
                pass
        counts["refused"] += 1
        with pytest.raises(EventDefinitionError, match="loop"):
            async with open_broker("memory://", codec=JSONCodec(LOOPING)):
                pass
        counts["refused"] += 1
        row = (9, uuid.uuid4(), "s", 1, "hostile.loop", 1, NOW, '{"n": 1}', None)
        with pytest.raises(EventDecodeError, match=r"position 9.*loop"):
            list(JSONCodec(LOOPING).iter_rows([row]))
        counts["refused"] += 1
    for problem in problems:
        print("problem:", problem)
    report(
        Row(
            scenario="Upcasters that raise, return no dict, recurse, loop; data they choke on",
            backend="SQLite store, memory and Redis brokers, the codec (hypothesis)",
            load=f"{valid} valid v1 events per path, plus generated data",
            faults=", ".join(name for name, _, _ in BAD_UPCASTS) + ", a loop of upcasters",
            events_in=counts["in"],
            events_out=counts["refused"] + counts["valid"],
            lost=counts["in"] - counts["refused"] - counts["valid"],
            duplicated=counts["duplicated"],
            notes="refused naming the row (store) or dead-lettered as EventDecodeError with the "
            "upcaster's error (Service, which goes on); a loop is refused when a store or "
            "broker opens",
            seconds=took[0],
        )
    )
    assert not problems, problems


# -- 4. oversized events and headers -----------------------------------------------------------

MB10 = 10_000_000


def _headers(count: int, size: int) -> dict[str, str]:
    return {f"h{number:04}": "v" * size for number in range(count)}


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "memory"])
async def test_oversized_events_and_headers_in_the_store(backend: str, tmp_path: Path) -> None:
    require(backend)
    url = store_url(backend, tmp_path)
    cases: list[tuple[str, Event, dict[str, str] | None, bool]] = [
        ("10 MB of data", Big(blob="x" * MB10), None, False),
        ("1,000 headers", Item(n=1), _headers(1000, 16), True),
        ("a 64 KB header value", Item(n=2), {"big": "v" * 65_536}, True),
        ("a 10,000-character header name", Item(n=3), {"k" * 10_000: "v"}, True),
        ("1,000 headers of 2 KB", Item(n=4), _headers(1000, 2048), False),
    ]
    problems: list[str] = []
    done = 0
    peak = 0
    try:
        with stopwatch() as took:
            async with open_store(url) as store:
                for number, (name, event, metadata, fits) in enumerate(cases):
                    stream = f"big-{number}"
                    try:
                        await store.append(stream, [event], metadata=metadata)
                    except EventTooLarge as exc:
                        ok = not fits and "max_event_size" in str(exc) and exc.size > exc.limit
                        ok = ok and await store.stream_version(stream) == 0
                    else:
                        [record], error = await attempt(lambda s=stream: store.read_stream(s))
                        headers = dict(record.metadata.headers)
                        ok = fits and error is None and record.event == event
                        ok = ok and all(headers.get(k) == v for k, v in (metadata or {}).items())
                    done += ok
                    if not ok:
                        problems.append(f"{name}: not as expected")
                await store.append("after", [Item(n=9)])  # and the store goes on
                assert [r.event async for r in store.read_stream("after")] == [Item(n=9)]
            # 10 MB where the limit allows it: stored and read back whole, at a bounded cost
            async with open_store(url, max_event_size=16 * 2**20) as store:
                tracemalloc.start()
                try:
                    await store.append("big-allowed", [Big(blob="y" * MB10)])
                    [record] = [r async for r in store.read_stream("big-allowed")]
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                ok = record.event.blob == "y" * MB10
                done += ok
                if not ok or peak > 30 * MB10:
                    problems.append(f"10 MB allowed: read back {ok}, peak {peak:,} bytes")
    finally:
        discard(url)
    for problem in problems:
        print("problem:", problem)
    report(
        Row(
            scenario="Oversized events and headers appended",
            backend={"sqlite": "SQLite", "postgres": "PostgreSQL", "memory": "memory"}[backend],
            load="one event per case, then 10 MB with max_event_size=16 MiB",
            faults=", ".join(name for name, *_ in cases),
            events_in=len(cases) + 1,
            events_out=done,
            lost=len(cases) + 1 - done,
            duplicated=0,
            notes="over max_event_size (1 MiB, data and metadata together): EventTooLarge "
            "naming size and limit, nothing written; the rest stored and read back whole; "
            f"10 MB allowed: peak {peak / 2**20:.0f} MiB traced for append and read",
            seconds=took[0],
        )
    )
    assert not problems, problems


_LIMIT_WORDS = ("payload", "header size", "frame_max", "too large", "exceed")


@pytest.mark.parametrize("backend", ["memory", "redis", "nats", "rabbitmq"])
async def test_oversized_messages_on_every_broker(backend: str) -> None:
    enabled(backend)
    topic, group = unique("big"), unique("g")
    cases = [
        ("10 MB of data", Big(blob="x" * MB10), None),
        ("1,000 headers", Big(blob="yy"), _headers(1000, 16)),
        ("a 64 KB header value", Big(blob="zzz"), {"big": "v" * 65_536}),
        ("1,000 headers of 1 KB", Big(blob="wwww"), _headers(1000, 1024)),
    ]
    outcomes: dict[str, str] = {}
    expected: Counter[Any] = Counter()
    problems: list[str] = []
    peak = 0
    foreign = [0]  # the size of the foreign message
    with stopwatch() as took:
        async with open_broker(broker_url(backend)) as broker, _Raw(backend, broker, topic) as raw:

            async def feed() -> None:
                for number, (name, event, metadata) in enumerate(cases):
                    started = time.perf_counter()
                    try:
                        async with asyncio.timeout(60):
                            await broker.publish(topic, event, metadata=metadata)
                    except TidingsError as exc:
                        if not any(word in str(exc) for word in _LIMIT_WORDS):
                            problems.append(f"{name}: refused without saying why: {exc}")
                        outcomes[name] = f"refused ({time.perf_counter() - started:.2f} s)"
                    else:
                        outcomes[name] = "delivered"
                        size = len(event.model_dump_json())
                        expected[(event.__event_type__, size, len(metadata or {}))] += 1
                    # the broker still works: a valid event right after
                    async with asyncio.timeout(15):
                        await broker.publish(topic, Item(n=number))
                    expected[number] += 1
                # and the same from a foreign producer: too large for a dead letter?
                foreign[0] = raw.client.max_payload - 4096 if backend == "nats" else MB10
                await raw.structured(b"\xff" * foreign[0])
                await broker.publish(topic, Item(n=len(cases)))
                expected[len(cases)] += 1

            if backend == "memory":
                tracemalloc.start()
            try:
                seen, letters, recovered = await _consume(
                    broker,
                    topic,
                    group,
                    feed,
                    valid=len(cases) + 1 + sum(1 for o in outcomes.values() if o == "delivered"),
                    hostile=1,
                    kinds=(Item, Big),
                )
            finally:
                if backend == "memory":
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
            await _drop_dead_letters(broker, letters)
    lost = sum(1 for key, count in expected.items() if seen[key] < count)
    duplicated = sum(max(0, seen[key] - count) for key, count in expected.items())
    if lost or duplicated or set(seen) - set(expected):
        problems.append(f"expected {dict(expected)}, seen {dict(seen)}")
    [letter] = letters
    if not letter.error.startswith("InvalidCloudEvent: "):
        problems.append(f"the foreign message's dead letter: {letter.error[:200]}")
    for problem in problems:
        print("problem:", problem)
    refused = sum(1 for outcome in outcomes.values() if outcome.startswith("refused"))
    report(
        Row(
            scenario="Oversized messages published by tidings and by a foreign producer",
            backend={"memory": "memory", "redis": "Redis", "nats": "NATS JetStream"}.get(
                backend, "RabbitMQ"
            ),
            load=f"{len(cases)} oversized events, each followed by a valid one",
            faults=", ".join(name for name, *_ in cases)
            + f"; a foreign message of {foreign[0] / 1e6:.1f} MB that is no CloudEvent",
            events_in=len(cases) * 2 + 2,
            events_out=sum(min(seen[key], count) for key, count in expected.items())
            + refused
            + len(letters),
            lost=lost,
            duplicated=duplicated,
            notes="; ".join(f"{name}: {outcome}" for name, outcome in outcomes.items())
            + f"; foreign: dead-lettered ({letter.error[-90:]!r}); all handled in "
            f"{recovered:.1f} s" + (f"; peak {peak / 2**20:.0f} MiB traced" if peak else ""),
            seconds=took[0],
        )
    )
    assert not problems, problems


# -- 5. SQL crafted into every name a store keeps ----------------------------------------------

SQL = [
    "'; DROP TABLE tidings_events; --",
    '"; DROP TABLE tidings_streams; --',
    "' OR '1'='1",
    "1; DELETE FROM tidings_events",
    "x' UNION SELECT * FROM tidings_events --",
    "a'||(SELECT version())||'",
    "$1",
    "$$; DROP SCHEMA public CASCADE; $$",
    "%",
    "_",
    "\\",
    "\\'",
    "?",
    ":name",
    "); --",
    "ünï©ødé 🎉 名前",
    "\u202eevil",
    "\n\r\t",
    "x" * 512,
]


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "memory"])
async def test_sql_in_stream_ids_metadata_and_names_is_kept_as_data(
    backend: str, tmp_path: Path
) -> None:
    """Stream ids (the conformance suite's `test_stream_ids_are_data` covers plain appends)
    plus metadata, correlation ids, type filters, snapshots, projection names, document keys,
    leases and data subjects: each stored verbatim or refused with a clear error; the tables
    intact afterwards."""
    require(backend)
    url = store_url(backend, tmp_path)
    problems: list[str] = []
    done = refused = 0
    inputs = len(SQL) + 4
    try:
        with stopwatch() as took:
            async with open_store(url) as store:
                await store.append("canary", [Item(n=-1)])
                tables = await _tables(backend, url)
                for number, text in enumerate(SQL):
                    try:
                        await _sql_round_trip(store, number, text)
                        done += 1
                    except AssertionError as exc:
                        problems.append(f"{text!r}: {exc}")
                # refused, each with a clear error and nothing written
                for stream, metadata, refusal, says in [
                    ("x" * 513, None, InvalidStreamId, "over the limit of 512"),
                    ("\ud800", None, InvalidStreamId, "not valid unicode"),
                    ("nul-1", {"correlation_id": "a\x00b"}, InvalidMetadata, "NUL"),
                    ("nul-2", {"h\x00": "v"}, InvalidMetadata, "NUL"),
                ]:
                    try:
                        await store.append(stream, [Item(n=0)], metadata=metadata)
                        problems.append(f"{stream[:20]!r} {metadata!r}: accepted")
                    except refusal as exc:
                        assert says in str(exc), exc
                        refused += 1
                streams = [s.stream_id async for s in store.streams()]
                assert "nul-1" not in streams and "nul-2" not in streams
                # positions and versions past what 64 bits hold: answered as the memory store
                # does, not a driver's OverflowError
                everything = len(SQL) + 1
                for position, count in [
                    (2**63, 0),
                    (10**30, 0),
                    (-5, everything),
                    (-1000, everything),
                ]:
                    records, error = await attempt(lambda a=position: store.read_all(a), 10**6)
                    inputs += 1
                    if error is None and len(records) == count:
                        refused += 1  # answered as it must be
                    else:
                        problems.append(f"read_all({position}): {len(records)} / {error!r}")
                for version, backwards, count in [(2**63, False, 0), (10**30, True, 1)]:
                    records, error = await attempt(
                        lambda v=version, b=backwards: store.read_stream("canary", v, backwards=b)
                    )
                    inputs += 1
                    if error is None and len(records) == count:
                        refused += 1
                    else:
                        problems.append(f"read_stream from {version}: {records} / {error!r}")
                assert [r.event async for r in store.read_stream("canary")] == [Item(n=-1)]
                after = await _tables(backend, url)
            if set(after) != set(tables):
                problems.append(f"tables before {sorted(tables)}, after {sorted(after)}")
            if tables and after["tidings_events"] != tables["tidings_events"] + len(SQL):
                problems.append(f"events: {tables} then {after}")
    finally:
        discard(url)
    for problem in problems:
        print("problem:", problem)
    report(
        Row(
            scenario="SQL crafted into stream ids, metadata, correlation ids, type filters, "
            "snapshots, projection names, document keys, leases, subjects",
            backend={"sqlite": "SQLite", "postgres": "PostgreSQL", "memory": "memory"}[backend],
            load=f"{len(SQL)} hostile strings through 11 store calls each",
            faults="quotes, comments, UNION, $1 and $$, LIKE wildcards, backslashes, unicode, "
            "RTL marks, 512 characters; 513 characters, a lone surrogate, NUL in metadata; "
            "positions and versions of 2**63, 10**30, -5, -1000",
            events_in=inputs,
            events_out=done + refused,
            lost=inputs - done - refused,
            duplicated=0,
            notes="stored and read back verbatim through every call; the refused ones raise "
            "InvalidStreamId / InvalidMetadata before writing; tables and the canary intact",
            seconds=took[0],
        )
    )
    assert not problems, problems


async def _sql_round_trip(store: Any, number: int, text: str) -> None:
    """`text` through every store call that takes a name: kept verbatim, never run."""
    meta = {"correlation_id": text, "causation_id": text, text: text, "k": text}
    result = await store.append(text, [Item(n=number, note=text)], metadata=meta)
    [record] = [r async for r in store.read_stream(text)]
    assert record.stream_id == text and record.event.note == text
    assert record.metadata.correlation_id == text and record.metadata.causation_id == text
    assert record.metadata.headers[text] == text
    assert await store.stream_version(text) == 1
    correlated = await store.read_correlation(text)
    assert [r.position for r in correlated] == [result.position], correlated
    assert [r async for r in store.read_all(types=[text])] == []
    await store.save_snapshot(text, 1, text, 1, json.dumps({"v": text}))
    snapshot = await store.read_snapshot(text)
    assert snapshot is not None and snapshot.type == text
    assert json.loads(snapshot.data) == {"v": text}
    name = f"p{number}{text}"
    await store.commit_projection(name, 1, 0, 1, {text: json.dumps({"v": text})})
    assert await store.get_document(name, text) == json.dumps({"v": text})
    assert [k async for k, _ in store.documents(name)] == [text]
    state = await store.projection_state(name)
    assert state is not None and state.name == name and state.position == 1
    assert await store.acquire_lease(text, text, 5)
    assert not await store.acquire_lease(text, "another", 5)
    await store.release_lease(text, text)
    await store.forget(text)


# -- 6. the console ------------------------------------------------------------------------------

TOKEN = "hostile-token-8c1d"
XSS = [
    '<script>alert("xss-1")</script>',
    '"><img src=x onerror=alert("xss-2")>',
    "<svg/onload=alert('xss-3')>",
    "javascript:alert('xss-4')",
    "</textarea></pre><script>alert('xss-5')</script>",
    "{{ 'pwn' ~ 'ed' }}{% print('pwn' ~ 'ed') %}",
]
RAW_MARKS = [  # what would run if a payload reached the page as markup (or a template)
    "<script>alert",
    "<img src=x",
    "<svg/onload",
    "</pre><script",
    "pwned",
    'href="javascript:',
    'src="javascript:',
    'action="javascript:',
]


class ConsoleSeen(Projection, name="hostile_console"):
    @on(Item)
    def item(self, event: Item, record: Any) -> None:
        self.view.put(str(event.n), True)


async def _console_fill(url: str, broker: BrokerBase) -> list[str]:
    """Markup in every field the console shows; returns the dead letters' ids."""
    streams = []
    async with open_store(url, codec=JSONCodec(keep_unknown=True)) as store:
        for number, payload in enumerate(XSS):
            stream = f"xss-{number}-{payload}"
            streams.append(stream)
            event = UnknownEvent(type=payload, version=1, data={"note": payload, payload: 1})
            metadata = {"correlation_id": payload, "causation_id": payload, payload: payload}
            await store.append(stream, [event, Item(n=number, note=payload)], metadata=metadata)
            await store.commit_projection(payload, 1, 0, 1, {payload: json.dumps(payload)})
    ids = []
    for number, payload in enumerate(XSS):
        letter_id = f"dl-{number}-" + payload.replace("/", "|")  # an id is one path segment
        message = Message(
            payload,
            {"id": payload, "type": payload, "source": payload, payload: payload},
            json.dumps({"note": payload}).encode(),
            payload,
            {payload: payload},
        )
        await broker._add_dead_letter(
            DeadLetter(letter_id, payload, payload, payload, 1, NOW, message)
        )
        ids.append(letter_id)
    return ids


async def test_the_console_escapes_markup_refuses_actions_without_the_token_and_odd_requests(
    tmp_path: Path,
) -> None:
    pytest.importorskip("starlette", reason="the console needs the console extra (starlette)")
    import httpx
    from markupsafe import escape

    from tidings.brokers.memory import MemoryBroker
    from tidings.console import AppParts, create_app

    url = f"sqlite:///{tmp_path / 'console.db'}"
    broker = MemoryBroker()
    await broker.open()
    letter_ids = await _console_fill(url, broker)
    parts = AppParts(
        "tests.reliability.test_hostile", projections={"hostile_console": ConsoleSeen()}
    )
    store = open_store(url, codec=JSONCodec(keep_unknown=True), create=False)
    app = create_app({"hostile.db": store}, broker, TOKEN, parts, sample_every=None)
    problems: list[str] = []
    counts: Counter[str] = Counter()
    streams = [f"xss-{n}-{p}" for n, p in enumerate(XSS)]

    def safe(response: httpx.Response, where: str, *shown: str) -> None:
        counts["in"] += 1
        body = response.text
        marks = [m for m in RAW_MARKS if m in body]
        missing = [s for s in shown if str(escape(s)) not in body]
        headers = response.headers
        if (
            response.status_code >= 500
            or marks
            or missing
            or "script-src 'self'" not in headers.get("content-security-policy", "")
            or headers.get("x-content-type-options") != "nosniff"
        ):
            problems.append(f"{where}: {response.status_code} raw {marks} missing {missing}")
        else:
            counts["safe"] += 1

    with stopwatch() as took:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client,
        ):
            # markup in every field, on every page
            pages: list[tuple[str, tuple[str, ...]]] = [
                ("/s/0/streams", tuple(streams)),
                ("/s/0/log", ()),
                ("/s/0/projections", ()),
                ("/dead-letters", ()),
                ("/groups", ()),
            ]
            for stream, payload in zip(streams, XSS, strict=True):
                path = quote(stream, safe="")
                pages += [
                    (f"/s/0/streams?q={quote(stream[:8] + payload, safe='')}", ()),
                    (f"/s/0/stream/{path}", (stream,)),
                    (f"/s/0/state/{path}", ()),
                    (f"/s/0/stream/{path}-missing", ()),  # the 404 page names it
                    (f"/s/0/trace/{quote(payload, safe='')}", ()),
                    (f"/dead-letters?topic={quote(payload, safe='')}", ()),
                ]
            pages += [(f"/dead-letters/{quote(i, safe='')}", ()) for i in letter_ids]
            for path, shown in pages:
                safe(await client.get(path), path, *shown)
            # actions without the token change nothing
            before = [d.id for d in await broker.dead_letters()]
            target = quote(letter_ids[0], safe="")
            form = {"content-type": "application/x-www-form-urlencoded"}
            attempts: list[tuple[str, dict[str, str], bytes]] = [
                ("no token", form, b""),
                ("a wrong token", form, b"token=wrong"),
                ("the token with a space", form, f"token={TOKEN}%20".encode()),
                ("the token in upper case", form, f"token={TOKEN.upper()}".encode()),
                ("an empty header", {"x-tidings-token": ""}, b""),
                ("a wrong header", {"x-tidings-token": TOKEN[:-1]}, b""),
                (
                    "the token as text/plain",
                    {"content-type": "text/plain"},
                    f"token={TOKEN}".encode(),
                ),
                ("a form of 100 KB", form, b"token=" + b"x" * 100_000),
            ]
            for name, headers, body in attempts:
                for path in (
                    f"/dead-letters/{target}/replay",
                    "/s/0/projections/hostile_console/rebuild",
                ):
                    counts["in"] += 1
                    response = await client.post(path, headers=headers, content=body)
                    if response.status_code in (403, 413):
                        counts["safe"] += 1
                    else:
                        problems.append(f"POST {path} with {name}: {response.status_code}")
            for path in (
                f"/dead-letters/{target}/replay?token={TOKEN}",
                "/s/0/projections/hostile_console/rebuild?token=" + TOKEN,
            ):
                counts["in"] += 1
                response = await client.post(path)
                counts["safe"] += response.status_code == 403
                if response.status_code != 403:
                    problems.append(f"POST {path} (token in the URL): {response.status_code}")
            counts["in"] += 1
            response = await client.get(f"/dead-letters/{target}/replay")
            counts["safe"] += response.status_code == 405
            if [d.id for d in await broker.dead_letters()] != before:
                problems.append("a dead letter was replayed without the token")
            if await store.projection_state("hostile_console") is not None:
                problems.append("a projection was rebuilt without the token")
            counts["in"] += 1
            response = await client.get("/s/0/streams", headers={"host": "evil.example"})
            counts["safe"] += response.status_code == 400
            # path traversal and odd requests: 4xx, never 500, never a file outside /static
            odd = [
                "/static/../app.py",
                "/static/..%2fapp.py",
                "/static/%2e%2e/app.py",
                "/static/%2e%2e%2fapp.py",
                "/static/..%5capp.py",
                "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                "/static//etc/passwd",
                "/static/console.js/../../app.py",
                "/static/%00",
                "/s/0/stream/..%2f..%2f..%2f..%2fetc%2fpasswd",
                "/s/0/state/..%2f..%2fapp.py",
                "/s/0/log?before=" + "9" * 30,
                "/s/0/log?before=-1",
                "/s/0/log?before=1e3",
                "/s/0/log?before=%00",
                "/s/0/log?before=%F0%9F%98%80",
                "/s/0/log?before=1&before=2",
                "/s/0/stream/xss-0?from=" + "9" * 30,
                f"/s/0/state/{quote(streams[0], safe='')}?version=" + "9" * 30,
                f"/s/0/state/{quote(streams[0], safe='')}?version=-5",
                "/s/0/streams?q=%ff%fe",
                "/s/0/streams?q=" + "x" * 20_000,
                "/s/0/streams?q=%00",
                "/s/0/streams?q=%ED%A0%80",
                "/s/0/streams?after=%F4%8F%BF%BF",
                "/s/0/streams?q[]=1",
                "/s/99999999999999999999/streams",
                "/s/-1/streams",
                "/s/0/trace/" + "x" * 10_000,
                "/s/0/trace?id=%00",
                "/s/0/trace/a?before=" + "9" * 30,
                "/s/0/log/live?after=x",
                "/dead-letters?after=%00",
                "/dead-letters/%00",
                "/dead-letters?topic=" + "9" * 1000,
            ]
            for path in odd:
                counts["in"] += 1
                response = await client.get(path)
                leaked = any(
                    text in response.text
                    for text in ("def create_app", "root:x:0:0", "{% block", "Traceback")
                )
                ok = response.status_code < 500 and not leaked
                if path.startswith("/static/"):
                    ok = ok and response.status_code in (400, 404)
                counts["safe"] += ok
                if not ok:
                    problems.append(f"GET {path[:80]}: {response.status_code} leaked {leaked}")
            assert (await client.get("/static/console.js")).status_code == 200
            # with the token, the same actions work (the refusals were for the token)
            response = await client.post(
                f"/dead-letters/{target}/replay", headers={"x-tidings-token": TOKEN}
            )
            assert response.status_code == 303, response.text
            assert len(await broker.dead_letters()) == len(before) - 1
    await broker.aclose()
    for problem in problems:
        print("problem:", problem)
    report(
        Row(
            scenario="Console: markup in every field and page, actions without the token, "
            "path traversal, odd parameters",
            backend="console (Starlette, httpx ASGI transport) on SQLite + memory broker",
            load=f"{len(XSS)} payloads in stream ids, types, data, metadata, correlation ids, "
            "projection names and dead letters",
            faults=f"{len(pages)} pages, {len(attempts) * 2 + 3} POSTs without a valid token, "
            f"{len(odd)} traversal and odd requests, a foreign Host",
            events_in=counts["in"],
            events_out=counts["safe"],
            lost=counts["in"] - counts["safe"],
            duplicated=0,
            notes="no raw markup on any page (escaped text, CSP script-src 'self', nosniff); "
            "replay and rebuild 403 without the token and nothing changed; traversal 404; "
            "no 500",
            seconds=took[0],
        )
    )
    assert not problems, problems


# -- 7. types naming Python objects --------------------------------------------------------------

TRAPPED: list[str] = []


class Trap(Event):
    """A real class, abstract (no `type=`) and so never registered: instantiating it leaves
    a mark."""

    n: int = 0

    def model_post_init(self, context: Any) -> None:
        TRAPPED.append("Trap")


class Bomb:
    """A plain class a dotted path can name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        TRAPPED.append("Bomb")


_AUDIT: list[tuple[str, tuple[Any, ...]]] = []
_AUDITING = [False]
_WATCHED = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "exec"}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _AUDITING[0] and (event in _WATCHED or event == "import"):
        _AUDIT.append((event, args))


def _named(event: str, args: tuple[Any, ...], words: set[str]) -> bool:
    """Whether an audited action is about one of `words` (the hostile names): a process
    started, or code compiled at run time (`eval`, `exec`) whose names or constants mention
    one. What Python runs for itself meanwhile (module bodies of lazy imports, methods that
    `dataclasses` and `attrs` generate) is neither."""
    if event != "exec":
        return True  # os.system, subprocess.Popen, ...: nothing here starts a process
    code = args[0]
    if not getattr(code, "co_filename", "<").startswith("<"):
        return False  # a module's body, from its file
    mentioned = {*getattr(code, "co_names", ()), *map(str, getattr(code, "co_consts", ()))}
    return any(word in text for text in mentioned for word in words)


@contextlib.contextmanager
def _watching() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Record, for the block, audit events that run code or start processes, and imports."""
    if not getattr(sys, "_tidings_hostile_hook", False):
        sys.addaudithook(_audit)  # hooks cannot be removed: this one is off outside the block
        sys._tidings_hostile_hook = True  # type: ignore[attr-defined]
    _AUDIT.clear()
    _AUDITING[0] = True
    try:
        yield _AUDIT
    finally:
        _AUDITING[0] = False


async def test_types_naming_python_objects_are_never_imported_or_instantiated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trap_module = f"hostile_trap_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{trap_module}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nclass Boom:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    names = [
        "os.system",
        "builtins.eval",
        "builtins.exec",
        "__import__",
        "subprocess.Popen",
        "pickle.loads",
        "tidings.core.events.Event",
        "tidings.core.events.UnknownEvent",
        f"{__name__}.Trap",
        f"{__name__}.Bomb",
        f"{__name__}.Item",  # a registered class, by its Python path
        f"{trap_module}.Boom",
        f"{trap_module}:Boom",
        f"__import__('{trap_module}')",
    ]
    TRAPPED.clear()
    counts: Counter[str] = Counter()
    problems: list[str] = []
    with stopwatch() as took, _watching() as audit:
        # the codec, directly and as a CloudEvent
        for name in names:
            counts["in"] += 1
            data = '{"n": 1}'
            with pytest.raises(TidingsError, match="no Event class"):
                JSONCodec().decode_event(name, 1, data)
            kept = JSONCodec(keep_unknown=True).decode_event(name, 1, data)
            ce = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "s", "type": name}
            with pytest.raises(EventDecodeError, match="no Event class"):
                tidings.from_cloudevent({**ce, "data": {"n": 1}})
            if isinstance(kept, UnknownEvent) and kept.type == name and kept.data == {"n": 1}:
                counts["refused"] += 1
        # the store: unknown on reading, raw where keep_unknown asks
        async with open_store(f"sqlite:///{tmp_path / 'types.db'}") as store:
            for number, name in enumerate(names):
                counts["in"] += 1
                await store.append(f"typed-{number}", [UnknownEvent(type=name, version=1, data={})])
                _, error = await attempt(lambda n=number: store.read_stream(f"typed-{n}"))
                [record], kept_error = await attempt(
                    lambda n=number: store.read_stream(f"typed-{n}", keep_unknown=True)
                )
                if (
                    isinstance(error, EventDecodeError)
                    and "no Event class" in str(error)
                    and kept_error is None
                    and isinstance(record.event, UnknownEvent)
                    and record.type == name
                ):
                    counts["refused"] += 1
                else:
                    problems.append(f"store, {name}: {error!r} {kept_error!r}")
        # brokers: dead-lettered as an unknown type, the consumer going on
        for backend in ("memory", "redis", "nats"):
            if backend not in BROKER_BACKENDS:
                continue
            require(backend)
            topic, group = unique("types"), unique("g")
            codec = JSONCodec(keep_unknown=True)
            async with open_broker(broker_url(backend), codec=codec) as broker:

                async def feed(broker: BrokerBase = broker, topic: str = topic) -> None:
                    for number, name in enumerate(names):
                        await broker.publish(topic, UnknownEvent(type=name, version=1, data={}))
                        await broker.publish(topic, Item(n=number))

                seen, letters, _ = await _consume(
                    broker, topic, group, feed, valid=len(names), hostile=len(names)
                )
                await _drop_dead_letters(broker, letters)
                if backend == "redis":
                    import redis.asyncio as aioredis

                    client = aioredis.Redis.from_url(REDIS)
                    keys = [k async for k in client.scan_iter(match=f"tidings:{topic}:*")]
                    if keys:
                        await client.delete(*keys)
                    await client.aclose()
            counts["in"] += 2 * len(names)
            counts["valid"] += sum(1 for n in range(len(names)) if seen[n] == 1)
            counts["duplicated"] += sum(c - 1 for c in seen.values())
            reasons = sorted(d.error for d in letters)
            expected = sorted(f"UnknownEventType: no class for {name!r}" for name in names)
            if reasons == expected:
                counts["refused"] += len(names)
            else:
                problems.append(f"{backend}: dead letters {reasons}")
    words = {"system", "eval", "exec", "__import__", "Popen", "loads", "Trap", "Bomb", "Boom"}
    words.add(trap_module)
    ran = [(e, args) for e, args in audit if e in _WATCHED and _named(e, args, words)]
    imported = [args[0] for event, args in audit if event == "import"]
    if TRAPPED or marker.exists() or trap_module in sys.modules or ran:
        problems.append(f"code ran: {TRAPPED} {marker.exists()} {ran!r:.300}")
    if any(str(name).split(".")[0] in (trap_module, "pickle", "subprocess") for name in imported):
        problems.append(f"imported: {imported}")
    for problem in problems:
        print("problem:", problem)
    report(
        Row(
            scenario="Types naming Python objects (os.system, builtins.eval, a module that "
            "must not load, real classes by their path)",
            backend="codec, SQLite store, memory + Redis + NATS brokers",
            load=f"{len(names)} hostile type names through every decoder, interleaved with "
            "valid events on the brokers",
            faults=", ".join(names[:7]) + ", dotted paths of test classes and a trap module",
            events_in=counts["in"],
            events_out=counts["refused"] + counts["valid"],
            lost=counts["in"] - counts["refused"] - counts["valid"],
            duplicated=counts["duplicated"],
            notes="type names are only looked up in the registry: unknown types refused "
            "(EventDecodeError), kept raw as UnknownEvent when asked, dead-lettered as "
            "UnknownEventType; audit hook: nothing imported, run or instantiated",
            seconds=took[0],
        )
    )
    assert not problems, problems


# -- 8. atheris ----------------------------------------------------------------------------------

_ATHERIS = '''
import sys

import atheris

with atheris.instrument_imports(include=["tidings"]):
    from tidings.brokers.envelope import Message
    from tidings.core.codec import JSONCodec
    from tidings.core.errors import EventDecodeError, TidingsError
    from tidings.core.events import Event
    from tidings.core.ids import uuid_from_bytes
    from tidings.store.sqlite import _from_micros


class Item(Event, type="hostile.item"):
    n: int
    note: str = ""


CODECS = [JSONCodec(), JSONCodec(keep_unknown=True)]
TYPES = ["hostile.item", "os.system", "builtins.eval"]


def structured(data: bytes) -> None:
    """A Redis entry, an SQS body: bytes to a message, then to an event, or a tidings error."""
    try:
        message = Message.from_structured("t", data)
    except TidingsError:
        return
    for codec in CODECS:
        try:
            message.record(codec)
        except TidingsError:
            pass
    message.structured()  # a replay re-encodes it


def stored(data: bytes) -> None:
    """A stored row, every column from the fuzzer: an event, or an error naming the row."""
    fdp = atheris.FuzzedDataProvider(data)
    position = fdp.ConsumeIntInRange(1, 2**63 - 1)
    row = (
        position,
        fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20)),
        fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 20)),
        fdp.ConsumeIntInRange(-(2**63), 2**63 - 1),
        fdp.PickValueInList(TYPES) if fdp.ConsumeBool() else fdp.ConsumeUnicode(12),
        fdp.ConsumeIntInRange(-3, 3),
        fdp.ConsumeIntInRange(-(2**63), 2**63 - 1),
        fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 300)),
        fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 200)) if fdp.ConsumeBool() else None,
    )
    for codec in CODECS:
        try:
            list(codec.iter_rows([row], id_of=uuid_from_bytes, time_of=_from_micros))
        except EventDecodeError as exc:
            if exc.position != position:
                raise


def one_input(data: bytes) -> None:
    if data:
        (structured if data[0] & 1 else stored)(data[1:])


atheris.Setup(sys.argv, one_input)
atheris.Fuzz()
'''


def _limit_address_space() -> None:
    """In the fuzzer's process: an input that makes decoding swallow memory ends as a
    MemoryError, which libFuzzer reports as a crash with that input."""
    resource.setrlimit(resource.RLIMIT_AS, (_FUZZ_ADDRESS_SPACE, _FUZZ_ADDRESS_SPACE))


_FUZZ_ADDRESS_SPACE = 4 * 2**30


def test_atheris_fuzzes_the_structured_decoder_and_the_row_decoder(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (pip install atheris): a fuzzing tool, optional")
    runs = scale(3_000, 1_000_000)
    script = tmp_path / "fuzz_decoders.py"
    script.write_text(_ATHERIS)
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    for number, body in enumerate([*_NASTY_BODIES[:4], b"\x01" + _structured_bytes(_doc())]):
        (seeds / f"seed-{number}").write_bytes(b"\x01" + body[:2000])
    with stopwatch() as took:
        done = subprocess.run(
            [
                sys.executable,
                str(script),
                f"-runs={runs}",
                "-seed=1",
                "-max_len=4096",
                "-timeout=20",
                # libFuzzer's RSS limit reads getrusage's peak, which a child inherits from
                # the process it was started from (Linux keeps the peak across fork and
                # exec): after a memory-hungry test the pytest process's peak alone tripped
                # it. The address-space limit below belongs to the fuzzer's own process.
                "-rss_limit_mb=0",
                str(seeds),
            ],
            preexec_fn=_limit_address_space,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=scale(120, 900),
            check=False,
        )
    output = done.stdout + done.stderr
    crashed = done.returncode != 0
    report(
        Row(
            scenario="atheris (coverage-guided) over the structured CloudEvent decoder and "
            "the stored-row decoder",
            backend="core, in a subprocess",
            load=f"{runs:,} runs, libFuzzer seed 1, inputs up to 4 KB",
            faults="mutated bytes: structured CloudEvents (from nasty seeds) and every column "
            "of a stored row",
            events_in=runs,
            events_out=0 if crashed else runs,
            lost=1 if crashed else 0,
            duplicated=0,
            notes="no crash: every input decoded or refused with a tidings error naming it"
            if not crashed
            else " ".join(  # libFuzzer's verdict (which limit, or which exception) and the input
                line
                for line in output.splitlines()
                if "ERROR: libFuzzer" in line or line.startswith(("Base64:", "MS:", "=="))
            )[-600:],
            seconds=took[0],
        )
    )
    assert not crashed, output[-3000:]
    assert f"Done {runs} runs" in output, output[-3000:]
