"""Scenarios 22-23: conditioned appends (dynamic consistency boundaries, DCB).

Every decision reads the events a query selects, then appends one event on the condition that
no event the same query selects was stored after the position it read up to:

    q = Query(QueryItem(types=[Registered], tags=[f"user:{name}"]))
    read = await store.read_query(q)              # the events and the head, one round trip
    await store.append(f"user-{name}", [Registered(name=name)],
                       condition=AppendCondition(q, after=read.head))

(eventsourcing's side is the same: its recorder's `read()` returns the events and a `head`,
and its append is conditioned after that head). A refused condition
(`AppendConditionFailed`) is a conflict: the decider reads and decides again until its append
goes in. The figure is successful appends per second; conflicts are counted and recorded
beside it. D deciders (D = 1 and D = 16) run at once, in two patterns:

- disjoint: each decision registers a new user name (`user:<decider>-<n>`, one event type and
  one tag per query), so the read finds nothing and no two conditions can ever clash;
- overlap: every decider credits one of the same 4 accounts (`account:hot-<block>-<i>`,
  decider d's decision n takes account (d + n) % 4; each block has 4 new ones, so a history
  stays as short as a block makes it, and the figures do not depend on how many blocks run):
  the read is that account's whole history (its balance is summed from it) and the new event
  carries the new balance, so concurrent deciders clash and retry. After each round every
  account's history is checked to be one unbroken chain of balances on both sides (no
  decision was made on stale facts), and the disjoint names to be stored once each.

The same work goes through (a) tidings, (b) eventsourcing's DCB recorder (9.5.6) where one
exists, and (c) tidings plain stream appends of the same events with no read and no condition
(`store.append(stream, [event])`), the "what does the condition cost" baseline:

- 22. PostgreSQL (the `--postgres` server): tidings' PostgresEventStore, one store shared by D
  asyncio tasks (pool max_size=16); eventsourcing's `PostgresDCBRecorderTT` (module
  `eventsourcing.dcb.postgres_tt`, through `DCBApplication`) from D threads (its API is
  synchronous), pool of 16 connections. Both sides run with the server's durability settings
  (synchronous_commit as recorded), and encode/decode the same JSON in the timed part
  (eventsourcing's events are `DCBEvent(type, data=json bytes, tags)`; its reads are decoded
  with json.loads). eventsourcing's recorder makes its tags table with a foreign key to its
  events table named without the schema, so it only works in a schema on the search_path: it
  runs in the `public` schema of a database of its own (`<run prefix>_dcb_es`, made for the
  run and dropped at its end), fresh tables per scenario and round (a new application name);
  tidings runs in fresh schemas of the usual database.
- 23. SQLite (a file per side and round, WAL, synchronous=FULL): tidings only, against
  tidings' plain appends; eventsourcing 9.5.6 has no DCB recorder for SQLite
  (`eventsourcing.dcb` offers `popo`, in memory, and `postgres_tt` only).

Within a round all the sides of one scenario are open at once and take turns in blocks (each
decider making a few decisions per block), the side going first rotating from block to block,
so a drifting fsync rate hits all alike; each side's clock runs only over its own blocks. The
best round per side is kept.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

import postgres_store
from postgres_store import Server
from sqlite_store import Measured, _drop, _fresh, _url
from tidings import AppendCondition, AppendConditionFailed, Event, Query, QueryItem, open_store

Advance = Callable[[int], None]

EVENTSOURCING_VERSION = "9.5.6"
DECIDERS = (1, 16)
MODES = ("disjoint", "overlap")
HOT_ACCOUNTS = 4
POOL = 16  # connections on each PostgreSQL side (tidings max_size, eventsourcing pool size)
MAX_RETRIES = 10_000


REGISTERED = "bench.dcb.user_registered"
CREDITED = "bench.dcb.account_credited"


class Registered(Event, type=REGISTERED, tags=("user:{name}",)):
    name: str


class Credited(Event, type=CREDITED, tags=("account:{account}",)):
    account: str
    amount: int
    balance: int  # the account's balance after this credit: the decision's output


@dataclass(frozen=True)
class DCBSizes:
    """Blocks per round and decisions per block (split over the deciders) per backend."""

    rounds: int
    pg_blocks: int
    pg_block_decisions: int
    sqlite_blocks: int
    sqlite_block_decisions: int
    cost_appends: int = 1000  # per side and round, in 22g/23e (a condition's cost alone)
    warm_decisions: int = 2  # per decider and side, untimed, before the first block

    def warm(self, deciders: int) -> int:
        """Warm-up decisions per decider: enough to touch every pooled connection (the
        eventsourcing pool hands its 16 out in turn, each preparing its statements)."""
        return max(self.warm_decisions, -(-2 * POOL // deciders))


# The blocks are the same size in both runs (an overlap block's accounts start empty, so a
# decision's read depends on the block's size only): the quick run has fewer of them.
FULL = DCBSizes(
    rounds=2, pg_blocks=6, pg_block_decisions=256, sqlite_blocks=6, sqlite_block_decisions=384
)
QUICK = DCBSizes(
    rounds=1,
    pg_blocks=2,
    pg_block_decisions=256,
    sqlite_blocks=2,
    sqlite_block_decisions=384,
    cost_appends=200,
)


def sizes_for(quick: bool, rounds: int | None = None) -> DCBSizes:
    """run.py's choice: the quick or full sizes, with `--rounds` if it was given."""
    sizes = QUICK if quick else FULL
    return sizes if rounds is None else replace(sizes, rounds=rounds)


class Phases(Protocol):
    def phase(self, description: str, total: int) -> AbstractContextManager[Advance]: ...


def _name(decider: int, n: int) -> str:
    return f"{decider}-{n}"


def _account(decider: int, n: int, block: int) -> str:
    """The account decision `n` of `decider` credits: one of the block's few hot ones."""
    return f"hot-{block}-{(decider + n) % HOT_ACCOUNTS}"


def _amount(decider: int, n: int) -> int:
    return 1 + (decider * 7 + n) % 100


# -- the deciders, one per side ----------------------------------------------------------------


@dataclass
class Tally:
    """One side's counts over a round's timed blocks."""

    seconds: float = 0.0
    appends: int = 0
    conflicts: int = 0


async def _tidings_decide(store: Any, mode: str, d: int, n: int, block: int) -> int:
    """One decision through tidings: read, decide, append on the condition. Conflicts."""
    conflicts = 0
    if mode == "disjoint":
        name = _name(d, n)
        query = Query(QueryItem(types=[Registered], tags=[f"user:{name}"]))
        while True:
            read = await store.read_query(query)
            if read.events:
                raise SystemExit(f"dcb: tidings found user {name} registered already")
            try:
                await store.append(
                    f"user-{name}",
                    [Registered(name=name)],
                    condition=AppendCondition(query, after=read.head),
                )
                return conflicts
            except AppendConditionFailed:
                conflicts += 1
                if conflicts > MAX_RETRIES:
                    raise
    account, amount = _account(d, n, block), _amount(d, n)
    query = Query(QueryItem(types=[Credited], tags=[f"account:{account}"]))
    while True:
        read = await store.read_query(query)
        balance = sum(record.event.amount for record in read.events)
        head = read.head
        try:
            await store.append(
                f"account-{account}",
                [Credited(account=account, amount=amount, balance=balance + amount)],
                condition=AppendCondition(query, after=head),
            )
            return conflicts
        except AppendConditionFailed:
            conflicts += 1
            if conflicts > MAX_RETRIES:
                raise


async def _plain_append(store: Any, mode: str, d: int, n: int, block: int) -> int:
    """The same event appended to its stream with no read and no condition."""
    if mode == "disjoint":
        name = _name(d, n)
        await store.append(f"user-{name}", [Registered(name=name)])
    else:
        account, amount = _account(d, n, block), _amount(d, n)
        await store.append(
            f"account-{account}", [Credited(account=account, amount=amount, balance=amount)]
        )
    return 0


async def _tidings_block(
    decide: Callable[[Any, str, int, int, int], Any],
    store: Any,
    mode: str,
    deciders: int,
    lo: int,
    hi: int,
) -> tuple[float, int]:
    async def decider(d: int) -> int:
        conflicts = 0
        for n in range(lo, hi):
            conflicts += await decide(store, mode, d, n, lo)
        return conflicts

    gc.collect()
    start = time.perf_counter()
    conflicts = await asyncio.gather(*(decider(d) for d in range(deciders)))
    return time.perf_counter() - start, sum(conflicts)


def _es_decide(recorder: Any, mode: str, d: int, n: int, block: int) -> int:
    """One decision through eventsourcing's DCB recorder: the same reads, JSON and append."""
    from eventsourcing.dcb.api import DCBAppendCondition, DCBEvent, DCBQuery, DCBQueryItem
    from eventsourcing.persistence import IntegrityError

    conflicts = 0
    if mode == "disjoint":
        name = _name(d, n)
        tag = f"user:{name}"
        query = DCBQuery(items=[DCBQueryItem(types=[REGISTERED], tags=[tag])])
        while True:
            response = recorder.read(query)
            for _ in response:
                raise SystemExit(f"dcb: eventsourcing found user {name} registered already")
            event = DCBEvent(type=REGISTERED, data=json.dumps({"name": name}).encode(), tags=[tag])
            try:
                recorder.append([event], DCBAppendCondition(query, after=response.head))
                return conflicts
            except IntegrityError:
                conflicts += 1
                if conflicts > MAX_RETRIES:
                    raise
    account, amount = _account(d, n, block), _amount(d, n)
    tag = f"account:{account}"
    query = DCBQuery(items=[DCBQueryItem(types=[CREDITED], tags=[tag])])
    while True:
        response = recorder.read(query)
        balance = 0
        for sequenced in response:
            balance += json.loads(sequenced.event.data)["amount"]
        data = {"account": account, "amount": amount, "balance": balance + amount}
        event = DCBEvent(type=CREDITED, data=json.dumps(data).encode(), tags=[tag])
        try:
            recorder.append([event], DCBAppendCondition(query, after=response.head))
            return conflicts
        except IntegrityError:
            conflicts += 1
            if conflicts > MAX_RETRIES:
                raise


def _es_block(
    pool: ThreadPoolExecutor, recorder: Any, mode: str, deciders: int, lo: int, hi: int
) -> tuple[float, int]:
    def decider(d: int) -> int:
        conflicts = 0
        for n in range(lo, hi):
            conflicts += _es_decide(recorder, mode, d, n, lo)
        return conflicts

    gc.collect()
    start = time.perf_counter()
    futures = [pool.submit(decider, d) for d in range(deciders)]
    conflicts = sum(future.result() for future in futures)
    return time.perf_counter() - start, conflicts


# -- checks: what each side stored -------------------------------------------------------------


def _check_chains(side: str, credits: list[tuple[str, int, int]], expected: int) -> None:
    """In position order, every credit's balance is its account's previous one plus its
    amount: no decision was made on stale facts."""
    if len(credits) != expected:
        raise SystemExit(f"dcb: {side} stored {len(credits)} credits, not {expected}")
    balances: dict[str, int] = {}
    for account, amount, after in credits:
        before = balances.get(account, 0)
        if after != before + amount:
            raise SystemExit(
                f"dcb: {side} stored a credit to {account} decided on stale facts "
                f"(balance {after} after {before} + {amount})"
            )
        balances[account] = after


async def _check_tidings(store: Any, mode: str, deciders: int, decisions: int, side: str) -> None:
    expected = deciders * decisions
    if mode == "disjoint":
        tags = [record.tags async for record in store.read_all(types=[Registered])]
        wanted = {(f"user:{_name(d, n)}",) for d in range(deciders) for n in range(decisions)}
        if len(tags) != expected or set(tags) != wanted:
            raise SystemExit(f"dcb: {side} stored {len(tags)} registrations, not {expected}")
        return
    credits = [
        (r.event.account, r.event.amount, r.event.balance)
        async for r in store.read_all(types=[Credited])
    ]
    if side == "plain":  # no reads: its balances mean nothing
        if len(credits) != expected:
            raise SystemExit(f"dcb: {side} stored {len(credits)} credits, not {expected}")
        return
    _check_chains(side, credits, expected)


def _check_es(recorder: Any, mode: str, deciders: int, decisions: int) -> None:
    from eventsourcing.dcb.api import DCBQuery, DCBQueryItem

    expected = deciders * decisions
    if mode == "disjoint":
        stored = list(recorder.read(DCBQuery(items=[DCBQueryItem(types=[REGISTERED])])))
        tags = {tuple(e.event.tags) for e in stored}
        wanted = {(f"user:{_name(d, n)}",) for d in range(deciders) for n in range(decisions)}
        if len(stored) != expected or tags != wanted:
            raise SystemExit(f"dcb: eventsourcing stored {len(stored)} registrations")
        return
    credits = []
    for sequenced in recorder.read(DCBQuery(items=[DCBQueryItem(types=[CREDITED])])):
        data = json.loads(sequenced.event.data)
        credits.append((data["account"], data["amount"], data["balance"]))
    _check_chains("eventsourcing", credits, expected)


# -- one round of one scenario: every side, block by block -------------------------------------


@dataclass
class Scenario:
    """One (backend, deciders, pattern): rates per round for each side."""

    backend: str
    deciders: int
    mode: str
    tidings: list[float] = field(default_factory=list)
    eventsourcing: list[float] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)
    conflicts: dict[str, list[int]] = field(default_factory=dict)
    attempts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.mode}_{self.deciders}"

    def record(self, side: str, tally: Tally) -> None:
        getattr(self, side).append(tally.appends / tally.seconds)
        self.conflicts.setdefault(side, []).append(tally.conflicts)
        self.attempts.setdefault(side, []).append(tally.appends + tally.conflicts)


async def _blocks(
    sides: dict[str, Callable[[int, int], Any]],
    deciders: int,
    blocks: int,
    per_decider: int,
    warm: int,
    advance: Advance,
) -> dict[str, Tally]:
    """Run every side's warm-up, then `blocks` blocks each, rotating who goes first."""
    names = list(sides)
    for name in names:
        await sides[name](0, warm)
    tallies = {name: Tally() for name in names}
    for index in range(blocks):
        lo = warm + index * per_decider
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, conflicts = await sides[name](lo, lo + per_decider)
            tally = tallies[name]
            tally.seconds += seconds
            tally.appends += deciders * per_decider
            tally.conflicts += conflicts
            advance(deciders * per_decider)
    return tallies


def _es_env(server: Server, database: str, pool: int) -> dict[str, str]:
    parts = urlsplit(server.dsn)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.dcb.postgres_tt",
        "POSTGRES_DBNAME": database,
        "POSTGRES_HOST": parts.hostname or "localhost",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username or "postgres",
        "POSTGRES_PASSWORD": parts.password or "",
        "POSTGRES_SCHEMA": "public",
        "POSTGRES_POOL_SIZE": str(pool),
        "POSTGRES_MAX_OVERFLOW": "0",
    }


def _es_app(server: Server, database: str, name: str) -> Any:
    from eventsourcing.dcb.application import DCBApplication

    # The application's name is the tables' prefix: a new one gives fresh tables.
    cls = type(f"Bench{name.title().replace('_', '')}", (DCBApplication,), {"name": name})
    return cls(env=_es_env(server, database, POOL))


async def _pg_round(
    server: Server,
    database: str | None,
    scenario: Scenario,
    number: int,
    sizes: DCBSizes,
    advance: Advance,
) -> None:
    deciders, mode = scenario.deciders, scenario.mode
    per_decider = max(1, sizes.pg_block_decisions // deciders)
    warm = sizes.warm(deciders)
    decisions = warm + sizes.pg_blocks * per_decider
    tag = f"s22_{mode}_{deciders}_{number}"
    ours_schema, plain_schema = server.schema(f"{tag}_t"), server.schema(f"{tag}_p")
    await server.drop(ours_schema, plain_schema)
    app = _es_app(server, database, f"r{number}_{mode}_{deciders}") if database else None
    pool = ThreadPoolExecutor(deciders) if app is not None else None
    try:
        async with (
            open_store(server.store_url(ours_schema), max_size=POOL) as ours,
            open_store(server.store_url(plain_schema), max_size=POOL) as plain,
        ):
            sides: dict[str, Callable[[int, int], Any]] = {
                "tidings": lambda lo, hi: _tidings_block(
                    _tidings_decide, ours, mode, deciders, lo, hi
                ),
                "plain": lambda lo, hi: _tidings_block(
                    _plain_append, plain, mode, deciders, lo, hi
                ),
            }
            if app is not None and pool is not None:
                recorder = app.recorder

                async def es(lo: int, hi: int) -> tuple[float, int]:
                    return _es_block(pool, recorder, mode, deciders, lo, hi)

                sides = {"tidings": sides["tidings"], "eventsourcing": es, "plain": sides["plain"]}
            tallies = await _blocks(sides, deciders, sizes.pg_blocks, per_decider, warm, advance)
            await _check_tidings(ours, mode, deciders, decisions, "tidings")
            await _check_tidings(plain, mode, deciders, decisions, "plain")
            if app is not None:
                _check_es(app.recorder, mode, deciders, decisions)
    finally:
        if pool is not None:
            pool.shutdown()
        if app is not None:
            app.close()
        await server.drop(ours_schema, plain_schema)
    for side, tally in tallies.items():
        scenario.record(side, tally)


async def _sqlite_round(
    directory: str, scenario: Scenario, number: int, sizes: DCBSizes, advance: Advance
) -> None:
    deciders, mode = scenario.deciders, scenario.mode
    per_decider = max(1, sizes.sqlite_block_decisions // deciders)
    warm = sizes.warm(deciders)
    decisions = warm + sizes.sqlite_blocks * per_decider
    tag = f"s23-{mode}-{deciders}-{number}"
    ours_path, plain_path = _fresh(directory, f"{tag}-t.db"), _fresh(directory, f"{tag}-p.db")
    try:
        async with (
            open_store(_url(ours_path), synchronous="full") as ours,
            open_store(_url(plain_path), synchronous="full") as plain,
        ):
            sides: dict[str, Callable[[int, int], Any]] = {
                "tidings": lambda lo, hi: _tidings_block(
                    _tidings_decide, ours, mode, deciders, lo, hi
                ),
                "plain": lambda lo, hi: _tidings_block(
                    _plain_append, plain, mode, deciders, lo, hi
                ),
            }
            tallies = await _blocks(
                sides, deciders, sizes.sqlite_blocks, per_decider, warm, advance
            )
            await _check_tidings(ours, mode, deciders, decisions, "tidings")
            await _check_tidings(plain, mode, deciders, decisions, "plain")
    finally:
        for path in (ours_path, plain_path):
            _drop(path)
    for side, tally in tallies.items():
        scenario.record(side, tally)


# -- the section: measure, then make the rows --------------------------------------------------


def eventsourcing_missing() -> str | None:
    """Why the eventsourcing side of scenario 22 cannot run, or None."""
    from importlib import metadata

    try:
        version = metadata.version("eventsourcing")
        import eventsourcing.dcb.postgres_tt  # noqa: F401 - needs psycopg and psycopg_pool
    except (metadata.PackageNotFoundError, ImportError) as exc:
        return (
            f"eventsourcing's DCB PostgreSQL module cannot be imported ({exc}); "
            'pip install -e ".[dev]" (eventsourcing[postgres]==9.5.6)'
        )
    if version != EVENTSOURCING_VERSION:
        return f"scenario 22 expects eventsourcing {EVENTSOURCING_VERSION}, not {version}"
    return None


async def _create_database(server: Server, database: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(server.dsn, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


async def _drop_database(server: Server, database: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server.dsn, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()


def measure_postgres(
    server: Server, sizes: DCBSizes, advance: Advance, with_eventsourcing: bool = True
) -> list[Scenario]:
    """Scenario 22: every (deciders, pattern), `sizes.rounds` rounds each."""
    scenarios = [Scenario("postgres", d, m) for d in DECIDERS for m in MODES]
    database = f"{server.prefix}_dcb_es" if with_eventsourcing else None
    if database is not None:
        asyncio.run(_create_database(server, database))
    try:
        for number in range(sizes.rounds):
            for scenario in scenarios:
                asyncio.run(_pg_round(server, database, scenario, number, sizes, advance))
    finally:
        if database is not None:
            asyncio.run(_drop_database(server, database))
    return scenarios


def measure_sqlite(directory: str, sizes: DCBSizes, advance: Advance) -> list[Scenario]:
    """Scenario 23: every (deciders, pattern), `sizes.rounds` rounds each."""
    scenarios = [Scenario("sqlite", d, m) for d in DECIDERS for m in MODES]
    for number in range(sizes.rounds):
        for scenario in scenarios:
            asyncio.run(_sqlite_round(directory, scenario, number, sizes, advance))
    return scenarios


def _decisions(sizes: DCBSizes, backend: str, deciders: int) -> int:
    """Timed appends per side and round."""
    blocks, per_block = (
        (sizes.pg_blocks, sizes.pg_block_decisions)
        if backend == "postgres"
        else (sizes.sqlite_blocks, sizes.sqlite_block_decisions)
    )
    return blocks * max(1, per_block // deciders) * deciders


def _info(scenario: Scenario, sizes: DCBSizes, server: Server | None) -> dict[str, Any]:
    deciders, mode = scenario.deciders, scenario.mode
    info: dict[str, Any] = {
        "deciders": deciders,
        "pattern": mode,
        "query": (
            "types=[user_registered], tags=['user:<new name>'] (nothing found, never clashes)"
            if mode == "disjoint"
            else f"types=[account_credited], tags=['account:hot-<block>-<i>'], {HOT_ACCOUNTS} "
            "accounts per block shared by all deciders (the account's history read whole, "
            "its balance summed; new accounts each block, so histories stay short)"
        ),
        "decision": "read = read_query(q) (the events and the head the read is complete up "
        "to); append one event with AppendCondition(q, after=read.head); a refused condition "
        "is retried from the read",
        "appends_per_side_and_round": _decisions(sizes, scenario.backend, deciders),
        "warm_up_decisions_per_decider": sizes.warm(deciders),
        "rounds": sizes.rounds,
        "appends_per_s": {
            side: [round(r, 1) for r in getattr(scenario, side)]
            for side in ("tidings", "eventsourcing", "plain")
            if getattr(scenario, side)
        },
        "conflicts_per_round": scenario.conflicts,
        "attempts_per_round": scenario.attempts,
        "plain": "tidings store.append(stream, [same event]), no read, no condition, "
        "expected_version=ANY",
    }
    if scenario.backend == "postgres":
        info["tidings"] = f"one PostgresEventStore (pool max_size={POOL}) shared by {deciders} "
        info["tidings"] += "asyncio task" + ("s" if deciders > 1 else "")
        if scenario.eventsourcing:
            info["eventsourcing"] = (
                f"eventsourcing {EVENTSOURCING_VERSION} DCBApplication, PERSISTENCE_MODULE="
                "eventsourcing.dcb.postgres_tt (PostgresDCBRecorderTT.read/append), "
                f"POSTGRES_POOL_SIZE={POOL}, {deciders} thread"
                + ("s" if deciders > 1 else "")
                + "; its conditional append takes LOCK TABLE ... IN EXCLUSIVE MODE (one "
                "conditional append at a time, store-wide) until its commit"
            )
        if server is not None:
            info["server"] = server.settings
    else:
        info["tidings"] = "open_store('sqlite:///...', synchronous='full'), WAL"
    return info


DCB_SCENARIOS = {
    "dcb_pg_disjoint_1": "22a. PG conditioned appends, 1 decider, disjoint, vs eventsourcing",
    "dcb_pg_overlap_1": "22b. PG conditioned appends, 1 decider, overlap, vs eventsourcing",
    "dcb_pg_disjoint_16": "22c. PG conditioned appends, 16 deciders, disjoint, vs eventsourcing",
    "dcb_pg_overlap_16": "22d. PG conditioned appends, 16 deciders, overlap, vs eventsourcing",
    "dcb_pg_vs_plain_1": "22e. PG decisions vs plain appends, 1 decider, disjoint",
    "dcb_pg_vs_plain": "22f. PG decisions vs plain appends, 16 deciders, disjoint",
    "dcb_pg_condition_cost": "22g. PG conditioned append alone vs plain append, 1 writer",
    "dcb_sqlite_disjoint_1": "23a. SQLite decisions vs plain appends, 1 decider, disjoint",
    "dcb_sqlite_overlap_1": "23b. SQLite decisions vs plain appends, 1 decider, overlap",
    "dcb_sqlite_disjoint_16": "23c. SQLite decisions vs plain appends, 16 deciders, disjoint",
    "dcb_sqlite_overlap_16": "23d. SQLite decisions vs plain appends, 16 deciders, overlap",
    "dcb_sqlite_condition_cost": "23e. SQLite conditioned append alone vs plain append, 1 writer",
}
# tidings / eventsourcing at 16 disjoint deciders is the target; the others ask for
# parity with eventsourcing and, against plain appends, what the condition may cost.
ES_TARGETS = {"disjoint_1": 1.0, "disjoint_16": 2.0, "overlap_1": 1.0, "overlap_16": 1.0}
PLAIN_TARGET = 0.7


def _conflicts_text(scenario: Scenario, side: str) -> str:
    return ", ".join(str(c) for c in scenario.conflicts.get(side, []))


def dcb_rows(
    sizes: DCBSizes,
    server: Server | str,
    directory: str,
    phases: Phases,
    row: Callable[..., Any],
    skipped: Callable[..., Any],
) -> tuple[list[Any], list[Any]]:
    """Scenarios 22-23 as run.py's rows (`row` and `skipped` are its Row and Skipped), or why
    some are skipped (`server` is then the reason for 22's)."""
    rows: list[Any] = []
    skips: list[Any] = []
    r = sizes.rounds
    rounds = f"{r} round{'s' * (r > 1)}"

    pg: list[Scenario] = []
    if isinstance(server, str):
        skips.extend(
            skipped(key, name, server) for key, name in DCB_SCENARIOS.items() if "_pg_" in key
        )
    else:
        missing = eventsourcing_missing()
        sides = 2 if missing else 3
        total = r * sides * sum(_decisions(sizes, "postgres", d) for d in DECIDERS) * len(MODES)
        with phases.phase(
            f"22. PG conditioned appends, 1 and 16 deciders, {sides} sides ({rounds})", total
        ) as advance:
            pg = measure_postgres(server, sizes, advance, with_eventsourcing=missing is None)
        for scenario in pg:
            key = f"dcb_pg_{scenario.key}"
            if missing:
                skips.append(skipped(key, DCB_SCENARIOS[key], missing))
                continue
            target = ES_TARGETS[scenario.key]
            rows.append(
                row(
                    key,
                    DCB_SCENARIOS[key],
                    "appends/s",
                    max(scenario.tidings),
                    max(scenario.eventsourcing),
                    f"eventsourcing {EVENTSOURCING_VERSION} DCB (postgres_tt), "
                    f"{scenario.deciders} thread{'s' * (scenario.deciders > 1)}, same work",
                    target,
                    f">= {target:g}x eventsourcing",
                    Measured(
                        list(scenario.tidings),
                        list(scenario.eventsourcing),
                        _info(scenario, sizes, server),
                    ),
                    extra={
                        "conflicts": {
                            "tidings": scenario.conflicts.get("tidings", []),
                            "eventsourcing": scenario.conflicts.get("eventsourcing", []),
                        }
                    },
                )
            )
        for scenario in pg:
            if scenario.mode != "disjoint":
                continue
            key = "dcb_pg_vs_plain" if scenario.deciders == 16 else "dcb_pg_vs_plain_1"
            rows.append(_plain_row(row, key, scenario, sizes, server))

    with phases.phase(
        f"23. SQLite conditioned appends, 1 and 16 deciders, 2 sides ({rounds})",
        r * 2 * sum(_decisions(sizes, "sqlite", d) for d in DECIDERS) * len(MODES),
    ) as advance:
        lite = measure_sqlite(directory, sizes, advance)
    for scenario in lite:
        rows.append(_plain_row(row, f"dcb_sqlite_{scenario.key}", scenario, sizes, None))

    urls = {"sqlite": "sqlite:///" + os.path.join(directory, "dcb-condition-cost.db")}
    if not isinstance(server, str):
        urls["pg"] = server.store_url(server.schema("dcb_cost"))
    for backend, url in urls.items():
        n = sizes.cost_appends
        with phases.phase(
            f"22g/23e. {backend} conditioned append alone ({rounds})", r * 2 * n
        ) as advance:
            cost = asyncio.run(_condition_cost(url, n, r, advance))
        key = f"dcb_{backend}_condition_cost"
        rows.append(
            row(
                key,
                DCB_SCENARIOS[key],
                "appends/s",
                max(cost.tidings),
                max(cost.raw),
                "plain appends of the same tagged events, same store, blocks taking turns",
                PLAIN_TARGET,
                f">= {PLAIN_TARGET:g}x plain",
                cost,
            )
        )
    return rows, skips


async def _condition_cost(url: str, n: int, rounds: int, advance: Advance) -> Measured:
    """One writer: appends of one tagged event with an `AppendCondition` on a new tag (what a
    unique-name claim does, without its read) against the same appends with none, in blocks
    of 100 taking turns on one store; best of `rounds`."""
    measured = Measured(
        info={"appends_per_side_and_round": n, "block": 100, "url": url.split("?")[0]}
    )
    async with open_store(url) as store:
        for number in range(rounds):
            spent = {"conditioned": 0.0, "plain": 0.0}
            for block in range(n // 100):
                order = ("plain", "conditioned") if block % 2 else ("conditioned", "plain")
                for side in order:
                    started = time.perf_counter()
                    for i in range(100):
                        name = f"{side}-{number}-{block}-{i}"
                        event = Registered(name=name)
                        if side == "plain":
                            await store.append(f"user-{name}", [event])
                        else:
                            query = Query(QueryItem(types=[Registered], tags=[f"user:{name}"]))
                            await store.append(
                                f"user-{name}", [event], condition=AppendCondition(query)
                            )
                    spent[side] += time.perf_counter() - started
                advance(200)
            measured.tidings.append(n // 100 * 100 / spent["conditioned"])  # appends per second
            measured.raw.append(n // 100 * 100 / spent["plain"])
        if url.startswith("postgresql"):
            async with store._connection() as conn:  # type: ignore[attr-defined]
                await conn.execute(f"DROP SCHEMA {store._s} CASCADE")  # type: ignore[attr-defined]
    return measured


def _plain_row(
    row: Callable[..., Any], key: str, scenario: Scenario, sizes: DCBSizes, server: Server | None
) -> Any:
    backend = "PostgreSQL" if scenario.backend == "postgres" else "SQLite"
    return row(
        key,
        DCB_SCENARIOS[key],
        "appends/s",
        max(scenario.tidings),
        max(scenario.plain),
        f"tidings plain appends on {backend}, same events, no read, no condition",
        PLAIN_TARGET,
        f">= {PLAIN_TARGET:g}x plain",
        Measured(list(scenario.tidings), list(scenario.plain), _info(scenario, sizes, server)),
        extra={"conflicts": {"tidings": scenario.conflicts.get("tidings", [])}},
    )


# -- standalone: python benchmarks/dcb.py [--quick] [--postgres URL] ----------------------------


def _main() -> None:  # pragma: no cover - a development aid; run.py is the bench
    import argparse
    import contextlib
    import tempfile

    parser = argparse.ArgumentParser(description="scenarios 22-23 alone")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--postgres", default=postgres_store.DEFAULT_URL)
    parser.add_argument("--only", choices=("postgres", "sqlite"), default=None)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL

    class Quiet:
        @contextlib.contextmanager
        def phase(self, description: str, total: int) -> Iterator[Advance]:
            print(description, total, flush=True)
            yield lambda n: None

    @dataclass
    class Row:
        key: str
        scenario: str
        unit: str
        tidings: float
        baseline: float
        baseline_label: str
        target: float
        target_text: str
        measured: Measured
        extra: dict[str, Any] = field(default_factory=dict)

    started = time.perf_counter()
    server = postgres_store.connect(args.postgres) if args.only != "sqlite" else "not asked"
    with tempfile.TemporaryDirectory(prefix="tidings-bench-dcb-") as directory:
        try:
            if args.only == "sqlite":
                server = "not asked"
            rows, skips = dcb_rows(sizes, server, directory, Quiet(), Row, lambda *a: a)
        finally:
            if isinstance(server, Server):
                server.drop_all()
    for item in rows:
        ratio = item.tidings / item.baseline
        print(
            f"{item.scenario:70} {item.tidings:9.0f} {item.baseline:9.0f} {ratio:6.2f}x "
            f"({item.target_text}) conflicts {item.extra.get('conflicts')}"
        )
        rates = item.measured.info.get("appends_per_s", {"tidings": item.measured.tidings})
        print(f"{'':70} per round {rates}")
    for skip in skips:
        print("skipped", skip)
    print(f"took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    _main()
