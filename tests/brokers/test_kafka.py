"""Kafka-only behaviour that needs no Kafka: URL options, records, and a member's bookkeeping.

The conformance, fault and interop suites run the adapter against a Kafka-protocol broker
(Tansu, started by the tests, or `TIDINGS_TEST_KAFKA=host:port`); these tests pin down the
parts that decide correctness in isolation: how messages become Kafka records and back (also
against the CloudEvents SDK's Kafka binding), the contiguous commit point, the encoding of
delivery counts, the dead-letter records, and a member's hand-out, ack, nack, counting-ahead
and hand-over logic on a stand-in for `AIOKafkaConsumer` (where every order of events can be
set up exactly).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import OffsetAndMetadata, TopicPartition  # type: ignore[import-untyped]
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given
from hypothesis import strategies as st

import tidings
from tidings.brokers import DeadLetter, Message, open_broker
from tidings.brokers.envelope import encode
from tidings.brokers.kafka import (
    _BUFFER,
    _COUNTS_MAX,
    KafkaBroker,
    KafkaBrokerError,
    OffsetTracker,
    _Consumer,
    _Partition,
    apply_dead_letter,
    dead_letter_value,
    decode_attempts,
    encode_attempts,
    from_record,
    to_record,
)
from tidings.core.errors import ConfigurationError, InvalidCloudEvent


class Placed(tidings.Event, type="test.kafka.placed"):
    order: str
    total: int


# -- URL options ---------------------------------------------------------------------------


def test_the_url_names_the_servers_and_the_options() -> None:
    broker = open_broker(
        "kafka://k1:9093,k2,[::1]:19092?partitions=3&replication=2&prefix=acme"
        "&session_timeout=6&heartbeat_interval=0.5&publish_timeout=2.5&client_id=svc&keyless=spread"
    )
    assert isinstance(broker, KafkaBroker)
    assert broker.servers == ["k1:9093", "k2:9092", "[::1]:19092"]
    assert (broker.partitions, broker.replication, broker.prefix) == (3, 2, "acme")
    assert (broker.session_timeout, broker.heartbeat_interval) == (6.0, 0.5)
    assert (broker.publish_timeout, broker.client_id, broker.keyless) == (2.5, "svc", "spread")
    assert broker.dead_letter_topic == "acme.dead-letters"
    assert broker.group_id("orders", "email") == "acme:orders:email"


def test_defaults_and_keywords_over_the_query() -> None:
    broker = KafkaBroker.from_url("kafka://?partitions=3", partitions=5)
    assert broker.servers == ["127.0.0.1:9092"]
    assert broker.partitions == 5
    assert broker.keyless == "spread"  # keyless records compete across members; no order
    assert broker.dead_letter_topic == "tidings.dead-letters"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://k:9092", "starts with 'kafka://'"),
        ("kafka://k:9092?shards=3", "unknown option 'shards'"),
        ("kafka://k:9092?partitions=many", "partitions='many' .* not a valid int"),
        ("kafka://k:9092?session_timeout=soon", "session_timeout='soon' .* not a valid float"),
        ("kafka://k:9092?partitions=0", "partitions must be 1-10000"),
        ("kafka://k:9092?replication=0", "replication must be at least 1"),
        ("kafka://k:9092?prefix=a:b", "prefix 'a:b'"),
        ("kafka://k:9092?publish_timeout=0", "publish_timeout must be positive"),
        ("kafka://k:9092?heartbeat_interval=10", "heartbeat_interval .* below session_timeout"),
        ("kafka://k:9092?keyless=random", "keyless is 'sticky' or 'spread'"),
        ("kafka://k:9092/topic", "no path"),
        ("kafka://user:secret@k:9092", "credentials do not go in a Kafka URL"),
        ("kafka://k:99999", "bad Kafka server 'k:99999'"),
        ("kafka://k:port", "bad Kafka server 'k:port'"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        KafkaBroker.from_url(url)


async def test_the_clients_accept_the_options_it_gives_them() -> None:
    broker = KafkaBroker("kafka://127.0.0.1:1", session_timeout=6, heartbeat_interval=2)
    consumer = broker._consumer("tidings:t:g")
    await consumer.stop()


async def test_an_unreachable_kafka_is_a_broker_error_within_the_bound() -> None:
    started = time.monotonic()
    with pytest.raises(KafkaBrokerError, match=r"cannot connect to Kafka at 127\.0\.0\.1:1"):
        async with open_broker("kafka://127.0.0.1:1?connect_timeout=3"):
            pass
    assert time.monotonic() - started < 10


# -- records -------------------------------------------------------------------------------


def test_a_message_becomes_a_record_with_ce_headers_and_its_key_and_back() -> None:
    event = Placed(order="o-1", total=3)
    message = encode(
        "orders", event, key="customer-7", metadata=tidings.Metadata.coerce({"tenant": "a b"})
    )
    key, value, headers = to_record(message)
    names = dict(headers)
    assert key == b"customer-7"
    assert value == message.data
    assert names["ce_type"] == b"test.kafka.placed"
    assert names["ce_specversion"] == b"1.0"
    assert names["content-type"] == b"application/json"
    assert "ce_datacontenttype" not in names
    back = from_record("orders", key, value, headers)
    assert back.key == "customer-7"
    assert back.record().event == event
    assert back.record().metadata.headers["tenant"] == "a b"


def test_a_keyless_message_has_no_record_key() -> None:
    key, _, _ = to_record(encode("orders", Placed(order="o", total=1)))
    assert key is None


def test_a_record_that_is_no_cloudevent_keeps_its_headers_and_body_for_the_dead_letter() -> None:
    headers = [("trace", b"\xff\xfe"), ("ce_type", b"x.y"), ("empty", None)]
    message = from_record("orders", b"\xffk", b"{not json", headers)
    assert message.key == "\ufffdk"
    assert message.attributes == {"type": "x.y"}
    assert message.headers["trace"] == "\ufffd\ufffd"
    assert message.headers["empty"] == ""
    assert message.data == b"{not json"
    with pytest.raises(InvalidCloudEvent):
        message.record()


def test_a_tombstone_on_a_topic_is_an_empty_message() -> None:
    message = from_record("orders", b"k", None, [])
    assert message.data == b""
    with pytest.raises(InvalidCloudEvent):
        message.record()


def test_the_sdk_reads_what_tidings_writes() -> None:
    event = Placed(order="o-2", total=9)
    key, value, headers = to_record(encode("orders", event, key="k-2"))
    parsed = ce_kafka.from_binary(
        ce_kafka.KafkaMessage(headers=dict(headers), key=key, value=value or b""), JSONFormat()
    )
    assert parsed.get_type() == "test.kafka.placed"
    assert parsed.get_id() == str(event.event_id)
    assert parsed.get_extension("partitionkey") == "k-2"
    assert parsed.get_data() == {"order": "o-2", "total": 9}


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_tidings_reads_what_the_sdk_writes(mode: str) -> None:
    event = CloudEvent(
        attributes={
            "type": "test.kafka.placed",
            "source": "/billing",
            "id": "11111111-2222-4333-8444-555555555555",
            "time": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            "datacontenttype": "application/json",
            "partitionkey": "k-3",
        },
        data={"order": "o-3", "total": 4},
    )
    write = ce_kafka.to_binary if mode == "binary" else ce_kafka.to_structured
    wire = write(event, JSONFormat())
    key = wire.key.encode() if isinstance(wire.key, str) else wire.key
    message = from_record("orders", key, wire.value, list(wire.headers.items()))
    assert message.key == "k-3"
    assert message.record().event == Placed(order="o-3", total=4)


# -- the commit point ----------------------------------------------------------------------


def test_the_commit_point_follows_the_contiguous_settled_prefix() -> None:
    offsets = OffsetTracker()
    assert offsets.position is None
    for offset in (3, 4, 7, 8):  # gaps: compaction, transaction markers
        offsets.read(offset)
    assert offsets.position == 3  # nothing settled: the next owner starts at the first
    assert offsets.settle(4) is None  # 3 is still in work
    assert offsets.settle(3) == 5  # 3 and 4 done
    assert offsets.position == 7
    assert offsets.settle(3) is None  # settled twice, or never read: nothing moves
    assert offsets.settle(5) is None
    assert offsets.settle(8) is None
    assert offsets.settle(7) == 9
    assert offsets.position == 9
    with pytest.raises(ValueError, match="read after"):
        offsets.read(8)


@given(st.permutations(list(range(12))), st.sets(st.integers(0, 11), max_size=4))
def test_the_commit_point_never_passes_an_offset_in_work(
    order: list[int], unfinished: set[int]
) -> None:
    offsets = OffsetTracker()
    for offset in range(12):
        offsets.read(offset * 2)  # even offsets only: gaps between
    committed = 0
    for index in order:
        if index in unfinished:
            continue
        moved = offsets.settle(index * 2)
        if moved is not None:
            assert moved > committed
            committed = moved
    first_open = min(unfinished, default=None)
    if first_open is None:
        assert offsets.position == 23
    else:
        assert offsets.position == first_open * 2
        assert committed <= first_open * 2


def test_delivery_counts_travel_in_commit_metadata() -> None:
    metadata = encode_attempts({12: 2, 10: 1, 11: 0})
    assert metadata == "tidings-attempts:10=1,12=2"
    assert decode_attempts(metadata) == {10: 1, 12: 2}
    assert encode_attempts({5: 0}) == ""
    assert decode_attempts("") == {}
    assert decode_attempts("someone else's metadata") == {}
    assert decode_attempts("tidings-attempts:1=2,bad,3=x") == {1: 2}


def test_too_many_counts_are_cut_within_their_bound() -> None:
    metadata = encode_attempts({offset: 3 for offset in range(10**9, 10**9 + 2000)})
    assert len(metadata) <= _COUNTS_MAX
    counts = decode_attempts(metadata)
    assert counts and set(counts.values()) == {3}
    assert min(counts) == 10**9  # the first ones are kept: they come back first


# -- dead-letter records -------------------------------------------------------------------


def dead_letter(dead_id: str, data: bytes = b'{"order":"o","total":1}') -> DeadLetter:
    message = Message(
        "orders",
        {"specversion": "1.0", "id": "e-1", "type": "test.kafka.placed", "partitionkey": "k"},
        data,
        "k",
        {"ce_id": "e-1", "content-type": "application/json"},
    )
    return DeadLetter(
        dead_id, "orders", "email", "boom", 2, datetime(2026, 1, 2, tzinfo=UTC), message
    )


@pytest.mark.parametrize("data", [b'{"order":"o","total":1}', b"\xff\xfe not utf-8"])
def test_a_dead_letter_record_reads_back_and_a_tombstone_removes_it(data: bytes) -> None:
    dead = dead_letter("d-1", data)
    value = dead_letter_value(dead)
    assert json.loads(value) == dead.to_dict()  # the one record format of every adapter
    seen: dict[str, DeadLetter] = {}
    apply_dead_letter(seen, b"d-1", value)
    apply_dead_letter(seen, b"d-2", dead_letter_value(dead_letter("d-2")))
    assert seen == {"d-1": dead, "d-2": dead_letter("d-2")}
    apply_dead_letter(seen, b"d-1", None)
    assert list(seen) == ["d-2"]


def test_a_dead_letter_of_a_message_near_the_record_limit_is_cut_to_fit() -> None:
    dead = dead_letter("d-1", b'"' * 900_000)  # 1.8 MB as JSON: over Kafka's 1 MiB
    value = dead_letter_value(dead)
    assert len(value) <= 1_000_000
    seen: dict[str, DeadLetter] = {}
    apply_dead_letter(seen, b"d-1", value)
    assert "cut from 1,8" in seen["d-1"].error


def test_unreadable_dead_letter_records_are_skipped() -> None:
    seen: dict[str, DeadLetter] = {}
    apply_dead_letter(seen, b"d-1", b"not json")
    apply_dead_letter(seen, b"d-2", b'{"id": "d-2"}')
    apply_dead_letter(seen, None, dead_letter_value(dead_letter("d-3")))
    assert seen == {}


# -- a member, on a stand-in consumer ------------------------------------------------------


class StandIn:
    """What a member calls on its `AIOKafkaConsumer`, recorded."""

    def __init__(self) -> None:
        self.commits: list[dict[Any, Any]] = []
        self.paused: set[Any] = set()

    async def commit(self, offsets: dict[Any, Any]) -> None:
        self.commits.append(dict(offsets))

    def pause(self, *partitions: Any) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: Any) -> None:
        self.paused.difference_update(partitions)

    def assignment(self) -> set[Any]:
        return {TP}


class HandedOver:
    """Stands in for the broker's attempts table: the counts each hand-over wrote."""

    def __init__(self) -> None:
        self.counts: list[dict[Any, str]] = []

    async def __call__(self, group_id: str, counts: dict[Any, str]) -> None:
        self.counts.append(dict(counts))


TP = TopicPartition("orders", 0)


def member(prefetch: int = 16) -> tuple[_Consumer, StandIn]:
    broker = KafkaBroker("kafka://127.0.0.1:9092")
    broker._hand_over_attempts = HandedOver()  # type: ignore[method-assign]
    consumer = _Consumer(broker, "orders", "email", broker.group_id("orders", "email"), prefetch)
    stand_in = StandIn()
    consumer.consumer = stand_in
    return consumer, stand_in


def record(offset: int, key: str | None, n: int, replay_for: str | None = None) -> Any:
    raw_key, value, headers = to_record(encode("orders", Placed(order=f"o{n}", total=n), key=key))
    if replay_for is not None:
        headers.append(("tidings-replay-group", replay_for.encode()))
    return SimpleNamespace(offset=offset, key=raw_key, value=value, headers=headers)


def fill(c: _Consumer, records: list[Any], carried: dict[int, int] | None = None) -> _Partition:
    part = c.partitions.setdefault(TP, _Partition(TP, carried or {}))
    c._add(part, records)
    return part


async def take(c: _Consumer, now: float) -> tuple[Any, float | None]:
    """`c.take`, after the delivery counts it asks for are written ahead (to the stand-in)."""
    taken = c.take(now)
    for _ in range(3):  # as the member's loop does: wait for the write, look again
        if c.marking is None:
            break
        await c.marking  # asked for before handing out (or, ahead, after it)
        if taken[0] is None:
            taken = c.take(now)
    return taken


def total(received: Any) -> int:
    return int(received.message.record().event.total)


async def test_one_key_is_handed_out_in_order_and_never_twice_at_once() -> None:
    c, kafka = member()
    fill(c, [record(0, "a", 0), record(1, "a", 1), record(2, "b", 2), record(3, None, 3)])
    now = time.monotonic()
    first, _ = await take(c, now)
    second, _ = await take(c, now)
    third, _ = await take(c, now)
    assert first is not None and second is not None and third is not None
    assert [total(r) for r in (first, second, third)] == [0, 2, 3]  # a:1 waits for a:0
    assert await take(c, now) == (None, None)
    await third.ack()  # offset 3 done, 0 is not: nothing to commit yet
    assert kafka.commits == []
    await first.ack()
    assert kafka.commits == [{TP: OffsetAndMetadata(1, "")}]
    fourth, _ = await take(c, now)
    assert fourth is not None and total(fourth) == 1
    await second.ack()
    await fourth.ack()
    assert kafka.commits[-1] == {TP: OffsetAndMetadata(4, "")}


async def test_deliveries_are_counted_ahead_so_a_crash_keeps_them() -> None:
    """Before a record is handed out, its delivery is in the attempts table (one write counts
    up to `prefetch` records ahead): a member killed while holding it loses no count."""
    c, _ = member(prefetch=2)
    written = c.broker._hand_over_attempts.counts  # type: ignore[attr-defined]
    fill(c, [record(0, "a", 0), record(1, "b", 1), record(2, "c", 2)])
    assert c.take(time.monotonic()) == (None, None)  # not counted yet: nothing handed out
    assert c.marking is not None
    await c.marking
    assert written == [{TP: "tidings-attempts:0=1,1=1"}]
    first, _ = c.take(time.monotonic())
    assert first is not None and first.attempt == 1
    await first.nack(0)
    again, _ = await take(c, time.monotonic())  # its second delivery is counted first too
    assert again is not None and again.attempt == 2
    last = decode_attempts(written[-1][TP])
    assert last[0] == 2  # its second delivery was counted before it went out
    assert last.get(1) == 1 and last.get(2, 1) == 1  # the others: one ahead at most
    assert len(written) <= 3  # a write counts several deliveries, not one each


async def test_prefetch_bounds_what_a_member_holds() -> None:
    c, _ = member(prefetch=1)
    fill(c, [record(0, "a", 0), record(1, "b", 1)])
    held, _ = await take(c, time.monotonic())
    assert held is not None
    assert await take(c, time.monotonic()) == (None, None)
    await held.ack()
    assert (await take(c, time.monotonic()))[0] is not None


async def test_a_nack_holds_the_message_and_its_key_until_the_delay_is_over() -> None:
    c, kafka = member()
    fill(c, [record(0, "a", 0), record(1, "a", 1), record(2, "b", 2)])
    now = time.monotonic()
    first, _ = await take(c, now)
    assert first is not None and first.attempt == 1
    await first.nack(5.0)
    other, soonest = await take(c, now)
    assert other is not None and total(other) == 2  # another key goes on
    nothing, soonest = await take(c, now)
    assert nothing is None and soonest is not None and soonest >= now + 4.9
    again, _ = await take(c, now + 6)
    assert again is not None and total(again) == 0 and again.attempt == 2
    await again.ack()
    assert kafka.commits == [{TP: OffsetAndMetadata(1, "")}]


async def test_handing_over_writes_the_delivery_counts_then_commits_the_commit_point() -> None:
    c, kafka = member()
    part = fill(c, [record(5, "a", 0), record(6, "b", 1), record(7, "c", 2), record(8, "d", 3)])
    now = time.monotonic()
    held, _ = await take(c, now)
    nacked, _ = await take(c, now)
    acked, _ = await take(c, now)
    assert held is not None and nacked is not None and acked is not None
    await acked.ack()  # offset 7: 5 and 6 are still open
    await nacked.nack(30)
    await c.hand_over([part])
    written = c.broker._hand_over_attempts.counts  # type: ignore[attr-defined]
    assert written[0] == {TP: "tidings-attempts:5=1,6=1,7=1,8=1"}  # counted ahead
    assert written[-1] == {TP: "tidings-attempts:5=1,6=1"}  # the exact counts win
    assert kafka.commits == [{TP: OffsetAndMetadata(5, "")}]
    assert c.held == 0
    await held.ack()  # too late: the next owner has it; nothing changes
    assert len(kafka.commits) == 1


async def test_the_next_owner_counts_on_from_the_carried_attempts() -> None:
    c, _ = member()
    fill(c, [record(5, "a", 0), record(6, "b", 1)], carried=decode_attempts("tidings-attempts:5=1"))
    first, _ = await take(c, time.monotonic())
    second, _ = await take(c, time.monotonic())
    assert first is not None and second is not None
    assert (first.attempt, second.attempt) == (2, 1)


async def test_replays_for_another_group_are_passed_over() -> None:
    c, kafka = member()
    fill(c, [record(0, "a", 0, replay_for="analytics"), record(1, "a", 1, replay_for="email")])
    mine, _ = await take(c, time.monotonic())
    assert mine is not None and total(mine) == 1
    assert (await take(c, time.monotonic()))[0] is None
    await mine.ack()
    assert kafka.commits == [{TP: OffsetAndMetadata(2, "")}]


async def test_records_fetched_twice_are_buffered_once() -> None:
    c, _ = member()
    part = fill(c, [record(0, "a", 0), record(1, "a", 1)])
    c._add(part, [record(1, "a", 1), record(2, "a", 2)])
    assert [entry.offset for entry in part.entries] == [0, 1, 2]


async def test_a_full_partition_is_paused_until_it_drains() -> None:
    c, kafka = member(prefetch=_BUFFER)
    part = fill(c, [record(n, f"k{n}", n) for n in range(_BUFFER)])
    assert kafka.paused == {TP}
    taken = [(await take(c, time.monotonic()))[0] for _ in range(_BUFFER)]
    for received in taken[: _BUFFER // 2 + 1]:
        assert received is not None
        await received.ack()
    assert kafka.paused == set() and not part.paused


async def test_commits_leave_out_partitions_no_longer_assigned() -> None:
    c, kafka = member()
    other = TopicPartition("orders", 1)
    await c.commit({other: OffsetAndMetadata(9, ""), TP: OffsetAndMetadata(3, "")})
    assert kafka.commits == [{TP: OffsetAndMetadata(3, "")}]


async def test_a_rebalance_lets_held_messages_finish_before_handing_over() -> None:
    c, kafka = member()
    c.broker.session_timeout = 2.0  # waits up to half of it
    fill(c, [record(0, "a", 0), record(1, "a", 1)])
    held, _ = await take(c, time.monotonic())
    assert held is not None
    revoking = asyncio.create_task(c.revoke())
    await asyncio.sleep(0.05)
    assert not revoking.done() and c.partitions == {}  # nothing more is handed out
    await held.ack()
    await asyncio.wait_for(revoking, 0.5)
    assert kafka.commits == [{TP: OffsetAndMetadata(1, "")}]  # offset 1: the next owner's


async def test_a_rebalance_hands_over_what_is_held_too_long() -> None:
    c, kafka = member()
    c.broker.session_timeout = 0.2
    fill(c, [record(0, "a", 0)])
    held, _ = await take(c, time.monotonic())
    assert held is not None
    await asyncio.wait_for(c.revoke(), 1)
    assert c.broker._hand_over_attempts.counts[-1] == {TP: "tidings-attempts:0=1"}  # type: ignore[attr-defined]
    assert kafka.commits == [{TP: OffsetAndMetadata(0, "")}]
    await held.ack()
    assert len(kafka.commits) == 1
