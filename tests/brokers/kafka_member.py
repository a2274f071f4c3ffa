"""One member of the "ledger" consumer group in its own process, for the group test to start,
stop and SIGKILL mid-stream.

    python tests/brokers/kafka_member.py URL TOPIC INBOX_DB_PATH NAME

Runs `Service("ledger", broker)` with one handler of TOPIC behind the SQLite inbox at
INBOX_DB_PATH. The handler writes one row `(n, key, NAME)` into the table `effects` through
`ctx.db`, in the inbox's transaction, so the row and the processed event id commit together
(the table has no unique constraint: only the inbox keeps an effect single). It prints
`handling <n> <attempt>` when the handler starts (the parent learns what ran where, and when to
kill), sleeps a few milliseconds so the stream takes a while, and writes the row.

It prints `ready` once the broker and inbox are open, the group is declared and the service
is running (its Kafka group join then completes in the background), and runs until SIGTERM,
which stops the service gracefully, or SIGKILL. The event class lives in a private
`TypeRegistry` (decode with `CODEC`); the test imports it from here.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys

from tidings import Context, Event, JSONCodec, Service, TypeRegistry, open_broker, open_inbox

REGISTRY = TypeRegistry()
CODEC = JSONCodec(REGISTRY)
GROUP = "ledger"  # the service's name, which is its handlers' consumer group


class Numbered(Event, type="test.kafka.groups.numbered", registry=REGISTRY):
    n: int
    key: str


async def serve(url: str, topic: str, inbox_path: str, name: str) -> None:
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    async with (
        open_broker(url, codec=CODEC) as broker,
        open_inbox(f"sqlite:///{inbox_path}") as inbox,
    ):
        service = Service(GROUP, broker)

        @service.handler(topic, inbox=inbox)
        async def apply(event: Numbered, ctx: Context) -> None:
            print(f"handling {event.n} {ctx.attempt}", flush=True)
            await asyncio.sleep(random.uniform(0.005, 0.02))  # inside the open transaction
            ctx.db.execute(
                "insert into effects (n, key, member) values (?, ?, ?)",
                (event.n, event.key, name),
            )

        await broker.declare(topic, GROUP)  # the service declares it too; this one we await
        running = asyncio.create_task(service.run(), name=f"member {name}")
        await asyncio.sleep(0)  # let it start subscribing
        print("ready", flush=True)
        told = asyncio.create_task(stopping.wait())
        await asyncio.wait({running, told}, return_when=asyncio.FIRST_COMPLETED)
        told.cancel()
        service.stop()  # in-flight handling finishes and is acked; nothing new is taken
        await running  # re-raises what ended it, if it ended by itself


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("topic")
    parser.add_argument("inbox_db_path")
    parser.add_argument("name")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.url, args.topic, args.inbox_db_path, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
