"""Issue 6's crash test: the relay is SIGKILLed at 20 random moments while 10,000 events are
appended and consumed through Redis into an inbox-protected read model. At the end the read
model equals a clean replay of the store: nothing lost, nothing applied twice.

The relay runs as `tidings relay` in its own process, restarted after each kill; the writer
and the consuming service run in this process. The seed is printed (shown when the test
fails); `TIDINGS_CRASH_SEED=<seed>` replays it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import uuid
from pathlib import Path

import pytest

import tidings
from tests.backends import REDIS, require
from tidings import Context, Service, open_broker, open_inbox, open_store

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="sends SIGKILL"),
]

EVENTS = 10_000
ACCOUNTS = 25
KILLS = 20
TOPIC = "ledger"


class Moved(tidings.Event, type="test.relay.moved"):
    account: str
    amount: int


async def _start_relay(store_url: str, broker_url: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidings.cli.main",
        "relay",
        "--store",
        store_url,
        "--broker",
        broker_url,
        "--route",
        f"test.relay.*={TOPIC}",
        "--lease",
        "1",
        "--batch-size",
        "50",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        line = await process.stdout.readline()  # "relay default (...): from position N"
    assert line.startswith(b"relay"), line
    return process


async def test_relay_killed_20_times_loses_nothing_and_the_inbox_applies_once(
    tmp_path: Path,
) -> None:
    require("redis")
    seed = int(os.environ.get("TIDINGS_CRASH_SEED", random.randrange(2**32)))
    print(f"TIDINGS_CRASH_SEED={seed}")
    rng = random.Random(seed)
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    broker_url = f"{REDIS}?prefix=crash-{uuid.uuid4().hex[:8]}"
    async with (
        open_store(store_url) as store,
        open_broker(broker_url) as broker,
        open_inbox(f"sqlite:///{tmp_path / 'read-model.db'}") as inbox,
    ):
        assert isinstance(inbox, tidings.SQLiteInbox) and inbox._conn is not None
        model = inbox._conn
        model.execute("create table balances (account text primary key, total int, n int)")
        service = Service("balances", broker)

        @service.handler(TOPIC, inbox=inbox)
        async def apply(event: Moved, ctx: Context) -> None:
            ctx.db.execute(
                "insert into balances values (?, ?, 1) on conflict (account) do update "
                "set total = total + excluded.total, n = n + 1",
                (event.account, event.amount),
            )

        await broker.declare(TOPIC, "balances")
        consuming = asyncio.create_task(service.run())

        async def write() -> None:
            written = 0
            while written < EVENTS:
                size = min(rng.randint(1, 60), EVENTS - written)
                account = f"acct-{rng.randrange(ACCOUNTS)}"
                amounts = [rng.randint(-500, 1000) for _ in range(size)]
                await store.append(account, [Moved(account=account, amount=a) for a in amounts])
                written += size
                await asyncio.sleep(rng.random() * 0.05)  # spread over the kills

        writing = asyncio.create_task(write())
        kills = 0
        try:
            while kills < KILLS:
                relay = await _start_relay(store_url, broker_url)
                await asyncio.sleep(rng.uniform(0.05, 0.6))
                relay.send_signal(signal.SIGKILL)
                await relay.wait()
                kills += 1
            await writing
            relay = await _start_relay(store_url, broker_url)  # the last one finishes the job
            head = await store.last_position()
            async with asyncio.timeout(120):
                while await inbox.processed("balances") < EVENTS:  # noqa: ASYNC110 - polls a database
                    await asyncio.sleep(0.1)
            checkpoint = (await store.projection_state("outbox:default")).position  # type: ignore[union-attr]
            relay.send_signal(signal.SIGTERM)
            await relay.wait()
        finally:
            for task in (writing,):
                task.cancel()
            if relay.returncode is None:
                relay.kill()
                await relay.wait()
            service.stop()
            await asyncio.wait_for(consuming, 15)
        assert kills == KILLS and checkpoint == head
        replay: dict[str, list[int]] = {}
        async for record in store.read_all():
            event = record.event
            assert isinstance(event, Moved)
            replay.setdefault(event.account, []).append(event.amount)
        expected = {account: (sum(a), len(a)) for account, a in replay.items()}
        got = {row[0]: (row[1], row[2]) for row in model.execute("select * from balances")}
        assert got == expected  # nothing lost, nothing applied twice
        assert await inbox.processed("balances") == EVENTS
        assert not await broker.dead_letters()
        # What went through Redis: every event, plus the re-publishes of killed batches.
        client = broker._client  # type: ignore[attr-defined]
        streams = [broker._stream(TOPIC, shard) for shard in [*range(broker.shards), -1]]  # type: ignore[attr-defined]
        published = sum([await client.xlen(stream) for stream in streams])
        print(f"{published} messages for {EVENTS} events: {published - EVENTS} re-published")
        assert published >= EVENTS
