"""The per-message budget of the hot paths, layer by layer, in µs (docs/performance.md).

    .venv/bin/python benchmarks/budget.py            # the Python layers, no server needed
    .venv/bin/python benchmarks/budget.py --redis    # and an awaited Redis publish: raw, tidings

Each layer is timed alone with `timeit` (best of 5 repeats), so the figures add up to what a
publish or a delivery costs in Python on top of the client library's round trip. `--redis`
times the round trip itself: raw `redis.asyncio` XADD of a body of the same size against
`broker.publish`, interleaved in blocks, best block of each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import timeit
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from tidings import Event
from tidings.brokers.envelope import encode
from tidings.brokers.nats.records import _wire
from tidings.brokers.rabbitmq.records import to_amqp
from tidings.brokers.redis.records import _fields, _message
from tidings.core.cloudevents import cloudevent_attributes
from tidings.core.codec import JSONCodec
from tidings.core.metadata import EMPTY
from tidings.core.recorded import RecordedEvent


class Placed(Event, type="budget.placed"):
    order: str
    total: int
    sku: str
    qty: int


def _best(fn: Callable[[], object], number: int = 20_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def layers() -> list[tuple[str, float]]:
    """Each Python layer of publishing and of receiving one message, alone."""
    codec = JSONCodec()
    event = Placed(order="o-1", total=1200, sku="sku-9", qty=2)
    message = encode("orders", event, codec=codec)
    encoded = codec.encode(event)
    record = RecordedEvent(
        encoded.id, "o-1", 3, 17, encoded.type, 1, datetime.now(UTC), event, EMPTY
    )
    fields = {b"ce": message.structured()}
    received = _message("orders", fields)
    return [
        ("publish: the event's JSON (codec.encode)", _best(lambda: codec.encode(event))),
        ("publish: the message (envelope.encode)", _best(lambda: encode("orders", event))),
        ("relay: a stored record's attributes", _best(lambda: cloudevent_attributes(record))),
        ("Redis, SQS: structured CloudEvent", _best(message.structured)),
        ("Redis: the stream entry's fields", _best(lambda: _fields(message))),
        ("NATS: binary-mode headers", _best(lambda: _wire(message, "ce-"))),
        ("RabbitMQ: the AMQP message", _best(lambda: to_amqp(message, "cloudEvents_"))),
        ("receive, Redis: entry -> message", _best(lambda: _message("orders", fields))),
        ("receive: message -> typed event", _best(lambda: received.record(codec))),
    ]


async def redis_round_trip(url: str, count: int = 2000, blocks: int = 6) -> dict[str, float]:
    """µs per awaited publish: raw XADD of a body of the same size, and tidings."""
    import redis.asyncio as aioredis

    from tidings import open_broker

    prefix = f"budget-{uuid.uuid4().hex[:8]}"
    raw = aioredis.Redis.from_url(url)
    async with open_broker(url, prefix=prefix) as broker:
        event = Placed(order="o-1", total=1200, sku="sku-9", qty=2)
        body = encode("orders", event).structured()
        times: dict[str, list[float]] = {"raw": [], "tidings": []}
        for _ in range(blocks):
            started = time.perf_counter()
            for _ in range(count):
                await raw.xadd(f"{prefix}:raw", {"ce": body})
            times["raw"].append((time.perf_counter() - started) / count * 1e6)
            events = [event.model_copy() for _ in range(count)]
            started = time.perf_counter()
            for each in events:
                await broker.publish("orders", each)
            times["tidings"].append((time.perf_counter() - started) / count * 1e6)
        keys = [key async for key in raw.scan_iter(f"{prefix}*")]
        if keys:
            await raw.delete(*keys)
    await raw.aclose()
    return {side: min(values) for side, values in times.items()} | {
        f"{side} median": statistics.median(values) for side, values in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", nargs="?", const="redis://127.0.0.1:6379/0", default=None)
    args = parser.parse_args()
    for name, micros in layers():
        print(f"{name:45} {micros:7.2f} µs")
    if args.redis:
        for side, micros in asyncio.run(redis_round_trip(args.redis)).items():
            print(f"Redis publish round trip, {side:21} {micros:7.1f} µs")


if __name__ == "__main__":
    main()
