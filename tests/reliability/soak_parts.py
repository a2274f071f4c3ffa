"""The soak test's processes: a writer at a steady rate, a consumer behind an inbox, and the
projection that `tidings worker --app tests.reliability.soak_parts` runs.

    python -m tests.reliability.soak_parts writer STORE_URL RATE SECONDS
    python -m tests.reliability.soak_parts consumer BROKER_URL TOPIC INBOX_URL

The writer appends `RATE` events a second (in batches of 1 to 10, on 50 streams) for
`SECONDS`, then prints `wrote N` and exits. The consumer applies each event to a table in its
inbox database, in one transaction with the inbox row, until SIGTERM. Events live in a
private registry, so their type names never meet other tests' events.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from typing import Any

from tidings import (
    Context,
    Event,
    JSONCodec,
    Projection,
    RecordedEvent,
    Service,
    TypeRegistry,
    on,
    open_broker,
    open_inbox,
    open_store,
)

REGISTRY = TypeRegistry()
CODEC = JSONCodec(REGISTRY)
STREAMS = 50


class Ticked(Event, type="soak.ticked", registry=REGISTRY):
    """One unit of steady load."""

    n: int
    amount: int


class SoakTotals(Projection, name="soak_totals"):
    """Per stream: how many events and their sum (compared with a replay at the end)."""

    @on(Ticked)
    def ticked(self, event: Ticked, record: RecordedEvent[Any]) -> None:
        document = self.view.get(record.stream_id, {"count": 0, "sum": 0})
        self.view.put(
            record.stream_id,
            {"count": document["count"] + 1, "sum": document["sum"] + event.amount},
        )


async def write(store_url: str, rate: float, seconds: float) -> int:
    rng = random.Random(7)
    written = 0
    async with open_store(store_url, codec=CODEC, create=False) as store:
        started = time.monotonic()
        while (now := time.monotonic() - started) < seconds:
            due = int(now * rate) - written  # keep to the rate, whatever each append took
            if due <= 0:
                await asyncio.sleep(0.005)
                continue
            size = min(due, rng.randint(1, 10))
            events = [Ticked(n=written + i, amount=rng.randint(1, 100)) for i in range(size)]
            await store.append(f"soak-{rng.randrange(STREAMS)}", events)
            written += size
    return written


async def consume(broker_url: str, topic: str, inbox_url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    async with open_broker(broker_url, codec=CODEC) as broker, open_inbox(inbox_url) as inbox:
        service = Service("soak", broker, registry=REGISTRY)

        @service.handler(topic, inbox=inbox)
        async def apply(event: Ticked, ctx: Context) -> None:
            ctx.db.execute("insert into effects (n, amount) values (?, ?)", (event.n, event.amount))

        conn = inbox._conn  # type: ignore[attr-defined]
        conn.execute("create table if not exists effects (n int, amount int)")  # no key:
        # a second insert of one event would show as a duplicate, not be hidden by a key
        running = asyncio.create_task(service.run())
        print("consuming", flush=True)
        await stop.wait()
        service.stop()
        await running


def main(argv: list[str]) -> None:
    role, *args = argv
    if role == "writer":
        store_url, rate, seconds = args
        print(f"wrote {asyncio.run(write(store_url, float(rate), float(seconds)))}", flush=True)
    elif role == "consumer":
        asyncio.run(consume(*args))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
