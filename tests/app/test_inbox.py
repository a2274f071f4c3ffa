"""The inbox: a handler's writes and the processed event id commit together, so an event
delivered twice has one effect, and a failed attempt leaves neither."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

import tidings
from tests.backends import POSTGRES, require
from tests.store.tcp_proxy import TcpProxy, server_of, through
from tidings import Context, Retry, Service, open_broker, open_inbox, open_store


class Credited(tidings.Event, type="test.inbox.credited"):
    account: str
    amount: int


@pytest.fixture(params=["sqlite", "postgres"])
async def inbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tidings.Inbox]:
    if request.param == "postgres":
        require("postgres")
        url = f"{POSTGRES}?schema=inbox_{uuid.uuid4().hex[:12]}"
    else:
        url = f"sqlite:///{tmp_path / 'inbox.db'}"
    async with open_inbox(url) as opened:
        if isinstance(opened, tidings.PostgresInbox):
            async with opened._pool.acquire() as conn:
                await conn.execute("create table balances (account text primary key, total int)")
        else:
            assert opened._conn is not None
            opened._conn.execute("create table balances (account text primary key, total int)")
        yield opened
        if isinstance(opened, tidings.PostgresInbox):
            async with opened._pool.acquire() as conn:
                await conn.execute(f"drop schema {opened.schema} cascade")


async def _credit(db: Any, account: str, amount: int) -> None:
    if isinstance(db, sqlite3.Connection):
        db.execute(
            "insert into balances values (?, ?) on conflict (account) "
            "do update set total = total + excluded.total",
            (account, amount),
        )
    else:
        await db.execute(
            "insert into balances values ($1, $2) on conflict (account) "
            "do update set total = balances.total + excluded.total",
            account,
            amount,
        )


async def _balances(inbox: tidings.Inbox) -> dict[str, int]:
    if isinstance(inbox, tidings.PostgresInbox):
        async with inbox._pool.acquire() as conn:
            rows = await conn.fetch("select account, total from balances")
        return {row["account"]: row["total"] for row in rows}
    assert isinstance(inbox, tidings.SQLiteInbox) and inbox._conn is not None
    return dict(inbox._conn.execute("select account, total from balances").fetchall())


async def test_an_event_delivered_twice_has_one_effect_and_a_failure_none(
    inbox: tidings.Inbox, tmp_path: Path
) -> None:
    async with (
        open_store(f"sqlite:///{tmp_path / 'events.db'}") as store,
        open_broker("memory://") as broker,
    ):
        service = Service("ledger", broker)
        calls: list[int] = []

        @service.handler("credits", inbox=inbox, retry=Retry(attempts=3, backoff=0.01))
        async def credit(event: Credited, ctx: Context) -> None:
            calls.append(event.amount)
            await _credit(ctx.db, event.account, event.amount)
            if event.amount == 7 and calls.count(7) == 1:
                raise RuntimeError("the first attempt fails after writing")

        await broker.declare("credits", "ledger")
        await store.append("acct-1", [Credited(account="a", amount=n) for n in (5, 7, 11)])
        records = [r async for r in store.read_all()]
        await broker.publish_records("credits", records)
        await broker.publish_records("credits", records[:2])  # a relay's re-publish
        runner = asyncio.create_task(service.run())
        for _ in range(200):
            if await inbox.processed("ledger") == 3 and len(calls) >= 4:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # let the duplicates arrive and be skipped
        service.stop()
        await asyncio.wait_for(runner, 5)
        assert sorted(calls) == [5, 7, 7, 11]  # the failed attempt ran again; no duplicate ran
        assert await _balances(inbox) == {"a": 23}  # the failed attempt's write rolled back
        assert await inbox.processed("ledger") == 3
        assert not await broker.dead_letters()


def test_inbox_urls_are_checked() -> None:
    with pytest.raises(tidings.ConfigurationError, match="inbox"):
        open_inbox("redis://127.0.0.1")
    with pytest.raises(tidings.ConfigurationError):
        open_inbox("sqlite:///x.db", table="bad; drop")


async def test_an_inbox_url_is_opened_for_each_run_and_a_relay_runs_in_a_block(
    tmp_path: Path,
) -> None:
    inbox_url = f"sqlite:///{tmp_path / 'inbox.db'}"
    async with (
        open_store(f"sqlite:///{tmp_path / 'events.db'}") as store,
        open_broker("memory://") as broker,
    ):
        service = Service("ledger", broker)
        seen: list[int] = []

        @service.handler("credits", inbox=inbox_url)
        async def credit(event: Credited, ctx: Context) -> None:
            assert isinstance(ctx.db, sqlite3.Connection)
            seen.append(event.amount)

        await broker.declare("credits", "ledger")
        for amounts in ([1, 2], [3]):
            await store.append("acct-1", [Credited(account="a", amount=n) for n in amounts])
            async with tidings.OutboxRelay(store, broker, "credits"):  # every event there
                runner = asyncio.create_task(service.run())
                for _ in range(200):
                    if len(seen) == 3 or (amounts == [1, 2] and len(seen) == 2):
                        break
                    await asyncio.sleep(0.02)
                service.stop()
                await asyncio.wait_for(runner, 5)
        assert seen == [1, 2, 3]  # the second run reopened the inbox; nothing ran twice


async def test_a_postgres_inbox_link_stalled_for_good_fails_the_attempt_not_the_consumer() -> None:
    """The link goes silent both ways, with no reset: the attempt fails with TimeoutError
    after `query_timeout`, and the next one runs on a new connection."""
    require("postgres")
    schema = f"inbox_{uuid.uuid4().hex[:12]}"
    try:
        async with TcpProxy(*server_of(POSTGRES)) as proxy, asyncio.timeout(60):
            url = f"{through(POSTGRES, proxy.port)}?schema={schema}&query_timeout=1"
            async with open_inbox(url) as inbox:
                assert isinstance(inbox, tidings.PostgresInbox) and inbox.query_timeout == 1
                async with inbox.transaction("c", "e-1") as db:
                    assert db is not None
                assert proxy.stall() >= 1
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(10), inbox.transaction("c", "e-2"):
                        pass
                failed_after = time.monotonic() - started
                async with asyncio.timeout(10), inbox.transaction("c", "e-2") as db:
                    assert db is not None  # the failed attempt left nothing
                assert await inbox.processed("c") == 2
    finally:
        conn = await asyncpg.connect(POSTGRES)  # straight to the server
        try:
            await conn.execute(f"drop schema if exists {schema} cascade")
        finally:
            await conn.close()
    assert 0.9 < failed_after < 5, f"failed after {failed_after:.2f}s"


def test_a_bad_inbox_query_timeout_is_a_configuration_error() -> None:
    with pytest.raises(tidings.ConfigurationError, match="query_timeout"):
        open_inbox("postgresql://127.0.0.1/test?query_timeout=soon")
    with pytest.raises(tidings.ConfigurationError, match="query_timeout"):
        tidings.PostgresInbox("postgresql://127.0.0.1/test", query_timeout=-1)
