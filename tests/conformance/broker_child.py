"""A member of a broker group in its own process, for the test to SIGKILL while it holds messages.

    python tests/conformance/broker_child.py URL TOPIC GROUP [--ack-every N] [--prefetch P]

Opens the broker at URL, joins GROUP on TOPIC and, for every delivery, prints
`got <n> <attempt>`. It acks the deliveries whose `n` is a multiple of `--ack-every`,
printing `acking <n>` before the ack and `acked <n>` once it returned, and holds every other
delivery unacked for as long as it lives. It never exits on its own: the test kills it.

The event class lives in a private `TypeRegistry` (decode with `CODEC`), so its type name
never meets other tests' events; the test imports it from here.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tidings import Event, JSONCodec, TypeRegistry
from tidings.brokers import Delivery, open_broker

REGISTRY = TypeRegistry()
CODEC = JSONCodec(REGISTRY)


class Numbered(Event, type="test.broker.faults.numbered", registry=REGISTRY):
    n: int


async def hold(url: str, topic: str, group: str, ack_every: int, prefetch: int) -> None:
    held: list[Delivery] = []  # referenced until the process dies: never acked, never nacked
    async with (
        open_broker(url, codec=CODEC) as broker,
        broker.subscribe(topic, group=group, prefetch=prefetch) as deliveries,
    ):
        print("subscribed", flush=True)
        async for delivery in deliveries:
            n = delivery.event.n  # type: ignore[attr-defined]
            print(f"got {n} {delivery.attempt}", flush=True)
            if n % ack_every == 0:
                print(f"acking {n}", flush=True)  # from here on it may be acked
                await delivery.ack()
                print(f"acked {n}", flush=True)
            else:
                held.append(delivery)
    print("the subscription ended", flush=True)  # should not happen: the test kills us first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("topic")
    parser.add_argument("group")
    parser.add_argument("--ack-every", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=8)
    args = parser.parse_args(argv)
    asyncio.run(hold(args.url, args.topic, args.group, args.ack_every, args.prefetch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
