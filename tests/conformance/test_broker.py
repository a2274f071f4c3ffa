"""The broker contract, on every backend in `tests.backends.BROKER_BACKENDS`."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tidings
from tests.backends import BROKER_BACKENDS, broker_url, require
from tidings.brokers import BrokerBase, Delivery, Message, open_broker
from tidings.brokers.base import DeadLetterNotFound


class Ordered(tidings.Event, type="test.broker.ordered"):
    key: str
    n: int


class Other(tidings.Event, type="test.broker.other"):
    text: str


@pytest.fixture(params=BROKER_BACKENDS)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerBase]:
    require(request.param)
    async with open_broker(broker_url(request.param)) as opened:
        yield opened


@pytest.fixture
def topic() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def take(
    deliveries: AsyncIterator[Delivery], count: int, timeout: float = 5
) -> list[Delivery]:
    out: list[Delivery] = []

    async def collect() -> None:
        async for delivery in deliveries:
            out.append(delivery)
            if len(out) == count:
                return

    await asyncio.wait_for(collect(), timeout)
    return out


async def test_a_published_event_arrives_typed_with_its_metadata(
    broker: BrokerBase, topic: str
) -> None:
    await broker.declare(topic, "g")
    event = Ordered(key="k", n=1)
    await broker.publish(topic, event, key="k", metadata={"correlation_id": "req-1", "tenant": "a"})
    async with broker.subscribe(topic, group="g") as deliveries:
        [delivery] = await take(deliveries, 1)
        assert delivery.event == event
        assert delivery.record.id == event.event_id
        assert (delivery.key, delivery.attempt, delivery.topic) == ("k", 1, topic)
        assert delivery.metadata.correlation_id == "req-1"
        assert delivery.metadata.headers["tenant"] == "a"
        await delivery.ack()


async def test_each_group_gets_every_event(broker: BrokerBase, topic: str) -> None:
    for group in ("email", "analytics"):
        await broker.declare(topic, group)
    await broker.publish_many(topic, [Ordered(key="k", n=n) for n in range(5)])
    for group in ("email", "analytics"):
        async with broker.subscribe(topic, group=group) as deliveries:
            got = await take(deliveries, 5)
            # Every event, once; keyless events promise no order (Kafka spreads them over
            # partitions), so the order is not part of this.
            assert sorted(d.event.n for d in got) == list(range(5))  # type: ignore[attr-defined]
            for delivery in got:
                await delivery.ack()


async def test_members_of_one_group_compete(broker: BrokerBase, topic: str) -> None:
    """Two members of one group share its messages, each message once. Where a group is
    one message group (EventBridge's fixed `MessageGroupId`), members take turns: the
    second gets nothing while the first holds a message, and the rest once it leaves."""
    await broker.declare(topic, "g")
    await broker.publish_many(topic, [Ordered(key=f"k{n}", n=n) for n in range(40)])
    seen: dict[str, list[int]] = defaultdict(list)
    both_busy = asyncio.Event()
    one_at_a_time = getattr(broker, "scheme", "") == "eventbridge"

    async def member(name: str, hold: bool) -> None:
        async with broker.subscribe(topic, group="g", prefetch=1) as deliveries:
            async for delivery in deliveries:
                seen[name].append(delivery.event.n)  # type: ignore[attr-defined]
                if seen["a"] and seen["b"]:
                    both_busy.set()
                if hold:  # until the other member has one too, however late it came
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(10):
                            await both_busy.wait()
                await delivery.ack()
                if sum(len(v) for v in seen.values()) == 40:
                    return

    tasks: list[asyncio.Task[None]] = []

    async def first_then_leave() -> None:
        async with broker.subscribe(topic, group="g", prefetch=1) as deliveries:
            delivery = await anext(aiter(deliveries))
            seen["a"].append(delivery.event.n)  # type: ignore[attr-defined]
            tasks.append(asyncio.create_task(member("b", hold=False)))
            await asyncio.sleep(1)  # b polls meanwhile and must get nothing
            assert not seen["b"], "a second member got a message while the group was held"
            await delivery.ack()

    try:
        if one_at_a_time:
            await asyncio.wait_for(first_then_leave(), 15)
        else:
            tasks += [asyncio.create_task(member(name, hold=True)) for name in ("a", "b")]
        await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    everything = sorted(n for values in seen.values() for n in values)
    assert everything == list(range(40))  # each once
    assert seen["a"] and seen["b"]  # both took a share


async def test_one_key_keeps_publish_order_across_four_members(
    broker: BrokerBase, topic: str
) -> None:
    await broker.declare(topic, "g")
    keys = [f"key-{i}" for i in range(8)]
    counters = dict.fromkeys(keys, 0)
    events = []
    for _ in range(160):
        key = random.choice(keys)
        events.append((key, Ordered(key=key, n=counters[key])))
        counters[key] += 1
    for key, event in events:
        await broker.publish(topic, event, key=key)
    processed: dict[str, list[int]] = defaultdict(list)
    done = asyncio.Event()

    async def member() -> None:
        async with broker.subscribe(topic, group="g") as deliveries:
            async for delivery in deliveries:
                event = delivery.event
                await asyncio.sleep(random.random() / 500)
                processed[event.key].append(event.n)  # type: ignore[attr-defined]
                await delivery.ack()
                if sum(map(len, processed.values())) == len(events):
                    done.set()

    tasks = [asyncio.create_task(member()) for _ in range(4)]
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for key in keys:
        assert processed[key] == list(range(counters[key])), key


async def test_unacked_messages_of_a_member_that_leaves_go_to_another(
    broker: BrokerBase, topic: str
) -> None:
    await broker.declare(topic, "g")
    await broker.publish(topic, Ordered(key="k", n=1))
    async with broker.subscribe(topic, group="g") as deliveries:
        [first] = await take(deliveries, 1)
        assert first.attempt == 1  # taken, never acked: the member goes away
    async with broker.subscribe(topic, group="g") as deliveries:
        [again] = await take(deliveries, 1)
        assert again.event == Ordered(key="k", n=1)
        assert again.attempt == 2
        await again.ack()


async def test_nack_with_delay_redelivers_later(broker: BrokerBase, topic: str) -> None:
    await broker.declare(topic, "g")
    await broker.publish(topic, Ordered(key="k", n=1))
    async with broker.subscribe(topic, group="g") as deliveries:
        [first] = await take(deliveries, 1)
        started = asyncio.get_running_loop().time()
        await first.nack(delay=0.3)
        [again] = await take(deliveries, 1)
        assert asyncio.get_running_loop().time() - started >= 0.25
        assert again.attempt == 2
        await again.ack()
        with pytest.raises(RuntimeError):
            await again.ack()  # settled once


async def test_a_group_declared_late_misses_earlier_events(broker: BrokerBase, topic: str) -> None:
    await broker.declare(topic, "early")
    await broker.publish(topic, Ordered(key="k", n=1))
    await broker.declare(topic, "late")
    await broker.publish(topic, Ordered(key="k", n=2))
    async with broker.subscribe(topic, group="late") as deliveries:
        [only] = await take(deliveries, 1)
        assert only.event.n == 2  # type: ignore[attr-defined]
        await only.ack()
    async with broker.subscribe(topic, group="early") as deliveries:
        got = await take(deliveries, 2)
        assert sorted(d.event.n for d in got) == [1, 2]  # type: ignore[attr-defined]


async def test_dead_letters_keep_the_error_attempts_and_message_and_replay(
    broker: BrokerBase, topic: str
) -> None:
    await broker.declare(topic, "g")
    await broker.publish(topic, Ordered(key="k", n=7))
    async with broker.subscribe(topic, group="g") as deliveries:
        [delivery] = await take(deliveries, 1)
        dead = await delivery.dead_letter("ValueError: no")
    [stored] = await broker.dead_letters(topic)
    assert (stored.id, stored.error, stored.attempts, stored.group) == (
        dead.id,
        "ValueError: no",
        1,
        "g",
    )
    assert stored.message.record(broker.codec).event == Ordered(key="k", n=7)
    replayed = await broker.replay(stored.id)
    assert replayed.id == stored.id and await broker.dead_letters(topic) == []
    async with broker.subscribe(topic, group="g") as deliveries:
        [again] = await take(deliveries, 1)
        assert again.event == Ordered(key="k", n=7)
        await again.ack()
    with pytest.raises(DeadLetterNotFound):
        await broker.replay(stored.id)


# -- the handler level ---------------------------------------------------------------------


async def run_until(service: tidings.Service, condition: Any, timeout: float = 10) -> None:
    """Run the service until `condition()` (sync or async) holds, then stop it."""
    runner = asyncio.create_task(service.run())
    try:
        for _ in range(int(timeout / 0.01)):
            met = condition()
            if asyncio.iscoroutine(met):
                met = await met
            if met:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not met within {timeout}s")
    finally:
        service.stop()
        await asyncio.wait_for(runner, 10)


async def test_handlers_are_chosen_by_event_class_and_others_skipped(
    broker: BrokerBase, topic: str
) -> None:
    service = tidings.Service("svc", broker)
    seen: list[Any] = []

    @service.handler(topic)
    async def on_ordered(event: Ordered, ctx: tidings.Context) -> None:
        seen.append(event)

    await broker.declare(topic, "svc")
    await broker.publish_many(topic, [Other(text="skip me"), Ordered(key="k", n=1)])
    await run_until(service, lambda: seen)
    assert seen == [Ordered(key="k", n=1)]
    assert await broker.dead_letters(topic) == []


async def test_a_failing_handler_is_retried_then_dead_lettered_then_replayed(
    broker: BrokerBase, topic: str
) -> None:
    service = tidings.Service("svc", broker)
    calls: list[int] = []
    healthy = False

    @service.handler(topic, retry=tidings.Retry(attempts=3, backoff=0.01))
    async def fragile(event: Ordered, ctx: tidings.Context) -> None:
        calls.append(ctx.attempt)
        if not healthy:
            raise ValueError(f"cannot handle {event.n}")

    await broker.declare(topic, "svc")
    await broker.publish(topic, Ordered(key="k", n=3))
    await run_until(service, lambda: has_dead_letters(broker, topic))
    assert calls == [1, 2, 3]
    [dead] = await broker.dead_letters(topic)
    assert (dead.error, dead.attempts) == ("ValueError: cannot handle 3", 3)
    healthy = True
    await broker.replay(dead.id)
    await run_until(service, lambda: len(calls) == 4)
    assert await broker.dead_letters(topic) == []


async def has_dead_letters(broker: BrokerBase, topic: str) -> bool:
    return bool(await broker.dead_letters(topic))


@pytest.mark.parametrize(
    ("attributes", "data", "reason"),
    [
        ({"type": "test.broker.ordered"}, b'{"key": "k", "n": 1}', "InvalidCloudEvent"),
        (None, b'{"key": "k", "n": "not a number"}', "EventDecodeError"),
        (None, b"not json at all", "EventDecodeError"),
    ],
)
async def test_poison_messages_are_dead_lettered_and_the_consumer_goes_on(
    broker: BrokerBase, topic: str, attributes: Any, data: bytes, reason: str
) -> None:
    service = tidings.Service("svc", broker)
    seen: list[Ordered] = []

    @service.handler(topic)
    async def on_ordered(event: Ordered) -> None:
        seen.append(event)

    await broker.declare(topic, "svc")
    good = tidings.brokers.envelope.encode(topic, Ordered(key="k", n=2))
    bad_attributes = dict(good.attributes) if attributes is None else attributes
    if attributes is None:
        bad_attributes["id"] = str(uuid.uuid4())
    await broker.publish_message(Message(topic, bad_attributes, data))
    await broker.publish_message(good)
    await run_until(service, lambda: seen)
    await run_until(service, lambda: has_dead_letters(broker, topic))
    assert seen == [Ordered(key="k", n=2)]
    [dead] = await broker.dead_letters(topic)
    assert dead.error.startswith(reason), dead.error


async def test_an_unknown_type_is_dead_lettered(broker: BrokerBase, topic: str) -> None:
    service = tidings.Service("svc", broker)

    @service.handler(topic)
    async def anything(event: tidings.Event) -> None: ...

    await broker.declare(topic, "svc")
    message = tidings.brokers.envelope.encode(topic, Ordered(key="k", n=1))
    attributes = dict(message.attributes, type="test.broker.nobody.knows")
    await broker.publish_message(Message(topic, attributes, message.data))
    await run_until(service, lambda: has_dead_letters(broker, topic))
    [dead] = await broker.dead_letters(topic)
    assert "test.broker.nobody.knows" in dead.error


async def test_follow_ups_carry_the_correlation_and_the_cause(
    broker: BrokerBase, topic: str
) -> None:
    service = tidings.Service("svc", broker)

    @service.handler(topic)
    async def forward(event: Ordered, ctx: tidings.Context) -> None:
        await ctx.publish(f"{topic}-out", Other(text=str(event.n)))

    await broker.declare(topic, "svc")
    await broker.declare(f"{topic}-out", "reader")
    original = Ordered(key="k", n=5)
    await broker.publish(topic, original, metadata={"correlation_id": "req-9"})
    runner = asyncio.create_task(service.run())
    try:
        async with broker.subscribe(f"{topic}-out", group="reader") as deliveries:
            [out] = await take(deliveries, 1)
    finally:
        service.stop()
        await asyncio.wait_for(runner, 10)
    assert out.metadata.correlation_id == "req-9"
    assert out.metadata.causation_id == str(original.event_id)


async def test_stop_lets_the_in_flight_handler_finish(broker: BrokerBase, topic: str) -> None:
    service = tidings.Service("svc", broker)
    started, finished = asyncio.Event(), []

    @service.handler(topic)
    async def slow(event: Ordered) -> None:
        started.set()
        await asyncio.sleep(0.2)
        finished.append(event.n)

    await broker.declare(topic, "svc")
    await broker.publish_many(topic, [Ordered(key="k", n=1), Ordered(key="k", n=2)])
    runner = asyncio.create_task(service.run())
    await asyncio.wait_for(started.wait(), 5)
    service.stop()
    await asyncio.wait_for(runner, 5)
    # One finished and was acked; the other (keyless: either one) was never taken.
    assert len(finished) == 1
    async with broker.subscribe(topic, group="svc") as deliveries:
        [left] = await take(deliveries, 1)
        assert {left.event.n, *finished} == {1, 2} and left.attempt == 1  # type: ignore[attr-defined]


async def test_cancelling_run_gives_the_in_flight_handler_its_bound(
    broker: BrokerBase, topic: str
) -> None:
    service = tidings.Service("svc", broker, shutdown_timeout=0.5)
    started, finished, cut_short = asyncio.Event(), [], []

    @service.handler(topic)
    async def handle(event: Ordered) -> None:
        started.set()
        try:
            await asyncio.sleep(0.1 if event.n == 1 else 30)
        except asyncio.CancelledError:
            cut_short.append(event.n)
            raise
        finished.append(event.n)

    await broker.declare(topic, "svc")
    await broker.publish(topic, Ordered(key="k", n=1))
    runner = asyncio.create_task(service.run())
    await asyncio.wait_for(started.wait(), 5)
    runner.cancel()  # within the bound: the handler finishes and its message is acked
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(runner, 5)
    assert finished == [1] and not cut_short

    await broker.publish(topic, Ordered(key="k", n=2))
    started.clear()
    runner = asyncio.create_task(service.run())
    await asyncio.wait_for(started.wait(), 5)
    runner.cancel()  # beyond the bound: cancelled, and the message stays with the broker
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(runner, 5)
    assert cut_short == [2]
    async with broker.subscribe(topic, group="svc") as deliveries:
        [left] = await take(deliveries, 1)
        assert left.event.n == 2  # type: ignore[attr-defined]
