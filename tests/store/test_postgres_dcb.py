"""PostgreSQL append conditions under concurrency: appends whose queries and events do not
overlap never wait for each other (no table lock); a writer of a matching event and a
conditioned append meet on one advisory key; a decision never misses an event still being
committed below the position it read up to."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import tidings
from tests.events import UserRegistered
from tests.store.test_postgres import raw_connection, schema_of
from tidings import AppendCondition, AppendConditionFailed, Query, QueryItem
from tidings.core.codec import TAG_SEPARATOR, JSONCodec
from tidings.core.query import Selection
from tidings.store.appending import Condition
from tidings.store.postgres.append import _locks, _query_json

pytestmark = pytest.mark.postgres


def claim_query(name: str) -> Query:
    return Query(QueryItem(types=[UserRegistered], tags=[f"username:{name}"]))


async def raw_claim(conn: Any, url: str, stream_id: str, name: str) -> int:
    """A conditioned append of a claim for `name` through the store's SQL function, on
    `conn` (in whatever transaction it has open), as another process would."""
    [encoded] = [JSONCodec().encode(UserRegistered(username=name))]
    selection = Selection.of(claim_query(name), tidings.default_registry)
    condition = Condition(selection, 0, None)
    locks, exclusive = _locks(schema_of(url), [encoded], condition)
    ok, _version, position, conflict, _ = await conn.fetchrow(
        "SELECT ok, version, last_position, conflict_position, conflict_type "
        f'FROM "{schema_of(url)}".tidings_append'
        "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        stream_id.encode(),
        -1,
        [encoded.id],
        [encoded.type],
        [encoded.schema_version],
        [encoded.data],
        None,
        [TAG_SEPARATOR.join(encoded.tags)],
        locks,
        exclusive,
        _query_json(condition),
        0,
    )
    assert ok, conflict
    return int(position)


async def test_disjoint_conditions_do_not_wait_and_overlapping_ones_do(pg_url: str) -> None:
    async with tidings.open_store(pg_url) as store, raw_connection() as conn:
        transaction = conn.transaction()
        await transaction.start()
        held = await raw_claim(conn, pg_url, "user-held", "ada")  # holds ada's key, in flight
        # Another name: neither its condition nor its event share a key with the open claim.
        other = await asyncio.wait_for(
            store.append(
                "user-bob",
                [UserRegistered(username="bob")],
                condition=AppendCondition(claim_query("bob"), after=0),
            ),
            5,
        )
        assert other.position > held
        plain = asyncio.create_task(store.append("notes", [UserRegistered(username="ada")]))
        rival = asyncio.create_task(
            store.append(
                "user-ada",
                [UserRegistered(username="ada")],
                condition=AppendCondition(claim_query("ada"), after=0),
            )
        )
        await asyncio.sleep(0.5)
        assert not plain.done() and not rival.done(), "they must wait for the open claim"
        await transaction.commit()
        await asyncio.wait_for(plain, 5)  # an unconditioned writer just goes after it
        with pytest.raises(AppendConditionFailed) as caught:
            await asyncio.wait_for(rival, 5)
        assert caught.value.position == held


async def test_a_decision_does_not_read_past_an_event_in_flight(pg_url: str) -> None:
    """The trap: a claim drew position 1 and is still committing; an unrelated append
    commits at 2. A decision that took 2 as the position it read up to would append over
    the claim once it commits. `last_position` stays below the open position instead."""
    async with tidings.open_store(pg_url) as store, raw_connection() as conn:
        transaction = conn.transaction()
        await transaction.start()
        held = await raw_claim(conn, pg_url, "user-held", "ada")
        await store.append("notes", [UserRegistered(username="zed")])
        head = await store.last_position()
        assert head < held
        decided = asyncio.create_task(
            store.append(
                "user-ada",
                [UserRegistered(username="ada")],
                condition=AppendCondition(claim_query("ada"), after=head),
            )
        )
        await asyncio.sleep(0.2)
        await transaction.commit()
        with pytest.raises(AppendConditionFailed):
            await asyncio.wait_for(decided, 5)
        assert await store.last_position() == 2


async def sequential_scans(url: str, events: int) -> dict[str, int]:
    """Sequential scans of the store's tables, once the server's statistics count `events`
    events inserted (a connection reports them as it ends, or about a second after its
    last report while idle)."""
    async with raw_connection() as conn:
        for _ in range(300):
            rows = await conn.fetch(
                "SELECT relname, seq_scan, n_tup_ins FROM pg_stat_user_tables "
                "WHERE schemaname = $1 AND relname IN "
                "('tidings_events', 'tidings_tags', 'tidings_streams')",
                schema_of(url),
            )
            if any(row[0] == "tidings_events" and row[2] == events for row in rows):
                return {row[0]: int(row[1]) for row in rows}
            await asyncio.sleep(0.05)
    raise AssertionError(f"the statistics never counted {events} events: {rows}")


async def test_a_connection_that_planned_on_a_small_log_still_appends_by_index(
    pg_url: str,
) -> None:
    """PL/pgSQL keeps each statement's plan for its session, made from the statistics of
    the moment: the append function once kept sequential scans planned while the log was
    small, so one connection's appends slowed with every event stored. Appends, conditioned
    or not, and decisions' reads on one connection that planned them early make none."""
    async with tidings.open_store(pg_url, min_size=1, max_size=1) as store:
        for n in range(10):  # past the 5 custom plans, on a log of a few events
            await store.append(f"user-{n}", [UserRegistered(username=f"u{n}")])
    before = await sequential_scans(pg_url, 10)
    async with tidings.open_store(pg_url, min_size=1, max_size=1) as store:
        for n in range(10, 400):
            name = f"u{n}"
            if n % 2:
                await store.append(f"user-{n}", [UserRegistered(username=name)])
                continue
            read = await store.read_query(claim_query(name))
            await store.append(
                f"user-{n}",
                [UserRegistered(username=name)],
                condition=AppendCondition(claim_query(name), after=read.head),
            )
        assert await store.last_position() == 400
    assert await sequential_scans(pg_url, 400) == before
