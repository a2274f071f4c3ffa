"""Scenarios 9-11: the PostgreSQL store against raw asyncpg and the eventsourcing library.

All three run against one server (`--postgres URL`, default `$TIDINGS_BENCH_POSTGRES` or
postgresql://postgres@127.0.0.1:5432/test), each side in schemas of its own named
`bench_<run id>_...`, all dropped at the end of the run (`Server.drop_all`).

- 9. single-event durable appends: tidings' `store.append(stream, [event], expected_version=v)`
  against raw asyncpg on one connection calling the same PL/pgSQL function
  (`"<schema>".tidings_append($1..$7)`, created in the raw side's schema by tidings' own
  migrations) with the same arguments: the stream id as UTF-8 bytes, the event's id, type,
  schema version and JSON text (encoded in the timed part, `workload.encode`), no metadata.
  Both sides run with the server's durability settings (recorded). The sides alternate in
  blocks of about 100 ms, as scenario 1 does, and end holding the same rows (checked).
- 10. 16 concurrent writers (asyncio tasks, one stream each, single-event appends, a pool of
  max_size=16) against the single-writer rate of eventsourcing 9.5.6 on the same server
  (`eventsourcing.postgres`, its own schema via POSTGRES_SCHEMA; one thread saving one
  account, one new event per save). Blocks of each side alternate; each side's time counts
  only its own blocks. The server's wait events during tidings' blocks are sampled (from
  pg_stat_activity) and recorded, as they explain the rate.
- 11. append-to-handler latency through LISTEN/NOTIFY: one store instance subscribes, a second
  one appends (so the wake-up can only come from the server's NOTIFY, not from the in-process
  signal), one event every `spacing` seconds, each waiting for its arrival first; the latency
  is the time the subscriber's loop receives the record minus the time just before the append
  call (so it includes the append's own durable commit). p50 and p99 (nearest rank) after a
  warm-up.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlite_store import Measured
from tidings import open_store
from workload import EVENT_TYPE, SCHEMA_VERSION, Item, encode, make_items

Advance = Callable[[int], None]

DEFAULT_URL = os.environ.get("TIDINGS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
EVENTSOURCING_VERSION = "9.5.6"
SETTINGS = ("server_version", "fsync", "synchronous_commit", "wal_sync_method", "commit_delay")


def _append_sql(schema: str) -> str:
    return (
        "SELECT ok, version, last_position "
        f'FROM "{schema}".tidings_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)'
    )


def _plain_locks(schema: str) -> tuple[list[int], list[bool]]:
    """The advisory keys tidings takes for one untagged event of the workload's type, with no
    condition: the raw side passes the same (worked out once, as a raw client would)."""
    from tidings.core.codec import EncodedEvent
    from tidings.store.postgres.append import _locks

    return _locks(schema, [EncodedEvent(uuid.uuid4(), EVENT_TYPE, SCHEMA_VERSION, "{}", 2)], None)


@dataclass(frozen=True)
class Server:
    """The PostgreSQL server under test and this run's schema prefix."""

    dsn: str  # the URL without its query's schema
    prefix: str
    settings: dict[str, str]

    def schema(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def store_url(self, schema: str) -> str:
        parts = urlsplit(self.dsn)
        query = [*parse_qsl(parts.query), ("schema", schema)]
        return urlunsplit(parts._replace(query=urlencode(query)))

    @property
    def address(self) -> str:
        parts = urlsplit(self.dsn)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"

    async def drop(self, *schemas: str) -> None:
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            for schema in schemas:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    def drop_all(self) -> None:
        """Drop every schema this run made (a crashed scenario's too)."""
        import asyncpg

        async def drop() -> None:
            conn = await asyncpg.connect(self.dsn, timeout=10)
            try:
                names = await conn.fetch(
                    "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)",
                    self.prefix + "_",
                )
                for (name,) in names:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


def connect(url: str, timeout: float = 3.0) -> Server | str:
    """The server at `url`, or why it cannot be used (a message for the skipped rows)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        return f"--postgres {url!r} is not a postgresql:// URL"
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"]
    dsn = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))
    address = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    try:
        import asyncpg
    except ImportError:
        return 'asyncpg is not installed (pip install -e ".[dev]")'

    async def probe() -> dict[str, str]:
        conn = await asyncpg.connect(dsn, timeout=timeout)
        try:
            return {name: str(await conn.fetchval(f"SHOW {name}")) for name in SETTINGS}
        finally:
            await conn.close()

    try:
        settings = asyncio.run(asyncio.wait_for(probe(), timeout + 1))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return (
            f"PostgreSQL is not reachable at {address} ({type(exc).__name__}: {exc}); "
            "start it or pass --postgres URL (or set TIDINGS_BENCH_POSTGRES)"
        )
    return Server(dsn, f"bench_{uuid.uuid4().hex[:8]}", settings)


def _start_clock() -> float:
    gc.collect()
    return time.perf_counter()


async def _same_rows(conn: Any, raw: str, ours: str) -> None:
    """Fail loudly unless both schemas hold the same events (all but position and time)."""
    columns = "id, stream_id, version, type, schema_version, data, metadata"
    counts = await conn.fetchrow(
        f'SELECT (SELECT count(*) FROM "{raw}".tidings_events), '
        f'(SELECT count(*) FROM "{ours}".tidings_events)'
    )
    differ = await conn.fetchval(
        f'SELECT count(*) FROM (SELECT {columns} FROM "{raw}".tidings_events '
        f'EXCEPT SELECT {columns} FROM "{ours}".tidings_events) d'
    )
    streams = await conn.fetchval(
        f'SELECT count(*) FROM (SELECT * FROM "{raw}".tidings_streams '
        f'EXCEPT SELECT * FROM "{ours}".tidings_streams) d'
    )
    if counts[0] != counts[1] or differ or streams:
        raise SystemExit(
            f"scenario 9: the two sides stored different events: {counts[0]} raw rows, "
            f"{counts[1]} tidings rows, {differ} raw rows not in tidings, {streams} stream "
            "versions differ"
        )


# -- 9. single-event appends: tidings against raw asyncpg, block by block ---------------------


async def _single_round(
    server: Server,
    number: int,
    items: list[Item],
    warm: int,
    block: int,
    streams: list[str],
    advance: Advance,
) -> tuple[float, float]:
    import asyncpg

    ours_schema = server.schema(f"s9_tidings_{number}")
    raw_schema = server.schema(f"s9_raw_{number}")
    async with open_store(server.store_url(raw_schema)):
        pass  # tidings' migrations make the raw side's tables and append function
    sql = _append_sql(raw_schema)
    locks, exclusive = _plain_locks(raw_schema)
    events = [item.event for item in items]  # what a caller holds
    try:
        async with open_store(server.store_url(ours_schema)) as store:
            conn = await asyncpg.connect(server.dsn)
            try:
                ours = dict.fromkeys(streams, 0)
                theirs = dict.fromkeys(streams, 0)

                async def tidings_block(lo: int, hi: int) -> float:
                    start = time.perf_counter()
                    for i in range(lo, hi):
                        stream = streams[i % len(streams)]
                        ours[stream] = (
                            await store.append(stream, [events[i]], expected_version=ours[stream])
                        ).version
                    return time.perf_counter() - start

                async def raw_block(lo: int, hi: int) -> float:
                    fetchrow = conn.fetchrow
                    start = time.perf_counter()
                    for i in range(lo, hi):
                        stream = streams[i % len(streams)]
                        item = items[i]
                        ok, version, _ = await fetchrow(
                            sql,
                            stream.encode(),
                            theirs[stream],
                            [uuid.UUID(bytes=item.id)],
                            [EVENT_TYPE],
                            [SCHEMA_VERSION],
                            [encode(item.data)],
                            None,
                            [None],
                            locks,
                            exclusive,
                            None,
                            0,
                        )
                        if not ok:
                            raise SystemExit(f"scenario 9: raw append to {stream} refused")
                        theirs[stream] = version
                    return time.perf_counter() - start

                await tidings_block(0, warm)
                await raw_block(0, warm)
                gc.collect()
                spent = {"tidings": 0.0, "raw": 0.0}
                count = 0
                for index, lo in enumerate(range(warm, len(items), block)):
                    hi = min(lo + block, len(items))
                    if index % 2 == 0:
                        spent["tidings"] += await tidings_block(lo, hi)
                        spent["raw"] += await raw_block(lo, hi)
                    else:
                        spent["raw"] += await raw_block(lo, hi)
                        spent["tidings"] += await tidings_block(lo, hi)
                    count += hi - lo
                    advance(2 * (hi - lo))
                await _same_rows(conn, raw_schema, ours_schema)
            finally:
                await conn.close()
    finally:
        await server.drop(ours_schema, raw_schema)
    return count / spent["tidings"], count / spent["raw"]


def single_appends(
    server: Server,
    count: int,
    rounds: int,
    advance: Advance,
    streams: int = 4,
    warm: int = 100,
    block: int = 100,
) -> Measured:
    """Scenario 9: `count` single-event durable appends per side and round, round-robin."""
    names = [f"account-{i}" for i in range(streams)]
    measured = Measured(
        info={
            "appends_per_round": count,
            "streams": streams,
            "warm_up_appends": warm,
            "interleaved_block_appends": block,
            "raw": "asyncpg, one connection, the same tidings_append() call and arguments",
            "tidings": "open_store(...) defaults: pool min_size=1, max_size=10, LISTEN on",
            "server": server.settings,
        }
    )
    for number in range(rounds):
        items = make_items(warm + count, seed=900 + number)
        ours, theirs = asyncio.run(
            _single_round(server, number, items, warm, block, names, advance)
        )
        measured.tidings.append(ours)
        measured.raw.append(theirs)
    return measured


# -- 10. 16 concurrent tidings writers against eventsourcing's single writer -----------------


def _es_env(server: Server, schema: str) -> dict[str, str]:
    parts = urlsplit(server.dsn)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.path.lstrip("/") or (parts.username or "postgres"),
        "POSTGRES_HOST": parts.hostname or "localhost",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username or "postgres",
        "POSTGRES_PASSWORD": parts.password or "",
        "POSTGRES_SCHEMA": schema,
    }


def eventsourcing_missing() -> str | None:
    """Why scenario 10's peer cannot run, or None."""
    from importlib import metadata

    try:
        version = metadata.version("eventsourcing")
        import eventsourcing.postgres  # noqa: F401 - needs psycopg and psycopg_pool
    except (metadata.PackageNotFoundError, ImportError) as exc:
        return (
            f"eventsourcing's PostgreSQL module cannot be imported ({exc}); "
            'pip install -e ".[dev]" (eventsourcing[postgres]==9.5.6, psycopg[binary])'
        )
    if version != EVENTSOURCING_VERSION:
        return f"scenario 10 expects eventsourcing {EVENTSOURCING_VERSION}, not {version}"
    return None


async def _sample_waits(server: Server, schema: str, counts: Counter[str], on: list[bool]) -> None:
    """Every 50 ms while `on[0]`: what the appending backends of `schema` wait for."""
    import asyncpg

    conn = await asyncpg.connect(server.dsn)
    try:
        while True:
            await asyncio.sleep(0.05)
            if not on[0]:
                continue
            rows = await conn.fetch(
                "SELECT wait_event_type, wait_event FROM pg_stat_activity "
                "WHERE state = 'active' AND pid <> pg_backend_pid() AND strpos(query, $1) > 0",
                f'"{schema}".tidings_append',
            )
            for kind, event in rows:
                counts["running (no wait)" if kind is None else f"{kind}:{event}"] += 1
    finally:
        await conn.close()


async def _concurrent_round(
    server: Server,
    number: int,
    writers: int,
    per_block: int,
    blocks: int,
    es_block: int,
    warm: int,
    advance: Advance,
) -> tuple[float, float, dict[str, Any]]:
    from peer_eventsourcing import ESAccount, ESBank

    ours_schema = server.schema(f"s10_tidings_{number}")
    es_schema = server.schema(f"s10_eventsourcing_{number}")
    streams = [f"account-{k}" for k in range(writers)]
    per_writer = warm + per_block * blocks
    items = make_items(writers * per_writer, seed=1000 + number)
    events = [
        [item.event for item in items[k * per_writer : (k + 1) * per_writer]]
        for k in range(writers)
    ]
    waits: Counter[str] = Counter()
    sampling = [False]
    await server.drop(es_schema)
    import asyncpg

    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{es_schema}"')  # eventsourcing does not make it
    finally:
        await conn.close()
    app = ESBank(env=_es_env(server, es_schema))
    try:
        account = ESAccount(owner="owner-0")
        app.save(account)
        es_saves = 1
        deposited = 0
        async with open_store(server.store_url(ours_schema), max_size=writers) as store:
            versions = [0] * writers

            async def writer(k: int, lo: int, hi: int) -> None:
                stream, mine, version = streams[k], events[k], versions[k]
                for i in range(lo, hi):
                    version = (
                        await store.append(stream, [mine[i]], expected_version=version)
                    ).version
                versions[k] = version

            async def tidings_block(lo: int, hi: int) -> float:
                sampling[0] = True
                start = time.perf_counter()
                await asyncio.gather(*(writer(k, lo, hi) for k in range(writers)))
                spent = time.perf_counter() - start
                sampling[0] = False
                return spent

            def es_saves_block(n: int) -> float:
                nonlocal deposited
                start = time.perf_counter()
                for k in range(n):
                    account.deposit(k + 1)
                    app.save(account)
                spent = time.perf_counter() - start
                deposited += n * (n + 1) // 2
                return spent

            sampler = asyncio.create_task(_sample_waits(server, ours_schema, waits, sampling))
            try:
                await tidings_block(0, warm)  # opens the pool's 16 connections
                es_saves_block(warm * 4)
                es_saves += warm * 4
                waits.clear()
                gc.collect()
                spent = {"tidings": 0.0, "eventsourcing": 0.0}
                for index in range(blocks):
                    lo = warm + index * per_block
                    if index % 2 == 0:
                        spent["tidings"] += await tidings_block(lo, lo + per_block)
                        spent["eventsourcing"] += es_saves_block(es_block)
                    else:
                        spent["eventsourcing"] += es_saves_block(es_block)
                        spent["tidings"] += await tidings_block(lo, lo + per_block)
                    es_saves += es_block
                    advance(writers * per_block + es_block)
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            if versions != [per_writer] * writers:
                raise SystemExit(f"scenario 10: tidings streams ended at {versions}")
            for k, stream in enumerate(streams):
                if await store.stream_version(stream) != per_writer:
                    raise SystemExit(f"scenario 10: tidings stream {k} lost appends")
        loaded = app.repository.get(account.id)
        if loaded.balance != deposited or loaded.version != es_saves:
            raise SystemExit("scenario 10: eventsourcing saved a wrong account")
    finally:
        app.close()
        await server.drop(ours_schema, es_schema)
    tidings_events = writers * per_block * blocks
    total = sum(waits.values()) or 1
    info = {
        "server_wait_events_during_tidings_blocks": {
            name: round(n / total, 3) for name, n in waits.most_common(6)
        },
        "wait_samples": sum(waits.values()),
    }
    return (
        tidings_events / spent["tidings"],
        es_block * blocks / spent["eventsourcing"],
        info,
    )


def concurrent_appends(
    server: Server,
    writers: int,
    per_block: int,
    blocks: int,
    es_block: int,
    rounds: int,
    advance: Advance,
    warm: int = 5,
) -> Measured:
    """Scenario 10: events/s of `writers` concurrent tidings tasks; `raw` is eventsourcing's
    single-writer saves/s (one event per save)."""
    measured = Measured(
        info={
            "writers": writers,
            "tidings_pool_max_size": writers,
            "tidings_events_per_round": writers * per_block * blocks,
            "tidings_events_per_block": writers * per_block,
            "eventsourcing_version": EVENTSOURCING_VERSION,
            "eventsourcing": "one thread, one Application (eventsourcing.postgres, its own "
            "schema), one account, one Deposited event per save",
            "eventsourcing_saves_per_round": es_block * blocks,
            "eventsourcing_saves_per_block": es_block,
            "warm_up_appends_per_writer": warm,
            "server": server.settings,
            "rounds": [],
        }
    )
    for number in range(rounds):
        ours, theirs, info = asyncio.run(
            _concurrent_round(server, number, writers, per_block, blocks, es_block, warm, advance)
        )
        measured.tidings.append(ours)
        measured.raw.append(theirs)
        measured.info["rounds"].append(info)
    return measured


# -- 11. append -> subscriber latency through LISTEN/NOTIFY ----------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def _latency(
    server: Server, warm: int, samples: int, spacing: float, advance: Advance
) -> list[float]:
    schema = server.schema("s11")
    items = make_items(warm + samples, seed=1100)
    arrived: dict[uuid.UUID, float] = {}
    waiting: dict[uuid.UUID, asyncio.Future[None]] = {}
    latencies: list[float] = []
    try:
        async with (
            open_store(server.store_url(schema), listen=False) as writer,
            open_store(server.store_url(schema)) as subscriber_store,
        ):

            async def subscriber() -> None:
                async for record in subscriber_store.subscribe():
                    arrived[record.id] = time.perf_counter()
                    future = waiting.pop(record.id, None)
                    if future is not None and not future.done():
                        future.set_result(None)

            task = asyncio.create_task(subscriber())
            loop = asyncio.get_running_loop()
            try:
                for i, item in enumerate(items):
                    event_id = item.event.event_id
                    waiting[event_id] = future = loop.create_future()
                    before = time.perf_counter()
                    await writer.append("latency", [item.event], expected_version=i)
                    try:
                        await asyncio.wait_for(future, 5.0)
                    except TimeoutError:
                        raise SystemExit(
                            f"scenario 11: event {i} did not reach the subscriber in 5 s"
                        ) from None
                    if i >= warm:
                        latencies.append(arrived[event_id] - before)
                        advance(1)
                    await asyncio.sleep(max(0.0, before + spacing - time.perf_counter()))
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await server.drop(schema)
    return latencies


def notify_latency(
    server: Server, warm: int, samples: int, advance: Advance, spacing: float = 0.007
) -> tuple[Measured, dict[str, float]]:
    """Scenario 11: per-event latencies (ms); returns the run and p50/p99/max/mean."""
    latencies = [1000 * s for s in asyncio.run(_latency(server, warm, samples, spacing, advance))]
    figures = {
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "mean_ms": statistics.fmean(latencies),
    }
    measured = Measured(
        tidings=[figures["p99_ms"]],
        info={
            "samples": samples,
            "warm_up_appends": warm,
            "spacing_ms": spacing * 1000,
            "percentiles": "nearest rank",
            "latency": "subscriber receives the record - just before the append call "
            "(includes the append's durable commit)",
            "subscriber": "store instance A, LISTEN on (default), subscribe()",
            "appender": "store instance B (listen=False), one event per append, each "
            "waiting for its arrival before the next",
            "server": server.settings,
        },
    )
    return measured, figures
