"""The event store contract, run against every backend (`store` is parametrised by URL).

A backend is done when it passes this whole file against the real thing.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tidings
from tests.events import Deposited, Note, Opened, Withdrew
from tidings import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    Event,
    EventDecodeError,
    EventIdConflict,
    EventTooLarge,
    InvalidEvents,
    InvalidExpectedVersion,
    InvalidMetadata,
    InvalidStreamId,
    JSONCodec,
    Metadata,
    NotAnEvent,
    StoreClosed,
    TidingsError,
    TypeRegistry,
    UnknownEvent,
    WrongExpectedVersion,
)


async def collect(iterator: Any) -> list[Any]:
    return [item async for item in iterator]


# -- appending and reading back ------------------------------------------------------------


async def test_append_returns_version_and_position(store: tidings.EventStore) -> None:
    first = await store.append("acc-1", [Opened(owner="ada"), Deposited(amount=100)])
    assert (first.version, first.position) == (2, 2)
    second = await store.append("acc-2", [Opened(owner="bob")])
    assert (second.version, second.position) == (1, 3)
    third = await store.append("acc-1", [Withdrew(amount=30)], expected_version=2)
    assert (third.version, third.position) == (3, 4)


async def test_read_stream_returns_typed_recorded_events(store: tidings.EventStore) -> None:
    events = [Opened(owner="ada"), Deposited(amount=100), Withdrew(amount=30)]
    before = datetime.now(UTC)
    await store.append("acc-1", events, metadata={"correlation_id": "c-1", "tenant": "t1"})
    records = await collect(store.read_stream("acc-1"))
    assert [r.event for r in records] == events
    assert [type(r.event) for r in records] == [Opened, Deposited, Withdrew]
    assert [r.version for r in records] == [1, 2, 3]
    assert [r.position for r in records] == [1, 2, 3]
    assert [r.type for r in records] == [
        "test.account.opened",
        "test.account.deposited",
        "test.account.withdrew",
    ]
    for record, event in zip(records, events, strict=True):
        assert record.stream_id == "acc-1"
        assert record.schema_version == 1
        assert isinstance(record.id, UUID) and record.id.version == 7
        assert record.id == event.event_id == record.event.event_id
        assert record.recorded_at.tzinfo is not None
        assert record.recorded_at.utcoffset() == UTC.utcoffset(None)
        assert before.replace(microsecond=0) <= record.recorded_at <= datetime.now(UTC)
        assert record.metadata == Metadata("c-1", None, {"tenant": "t1"})
        assert record.correlation_id == "c-1"


async def test_metadata_round_trips(store: tidings.EventStore) -> None:
    meta = Metadata(correlation_id="corr", causation_id="cause", headers={"user": "ü", "k": ""})
    await store.append("s", [Note(text="x")], metadata=meta)
    await store.append("s", [Note(text="y")])
    records = await collect(store.read_stream("s"))
    assert records[0].metadata == meta
    assert records[1].metadata == Metadata()


async def test_unknown_stream_reads_as_empty(store: tidings.EventStore) -> None:
    assert await collect(store.read_stream("nope")) == []
    assert await collect(store.read_stream("nope", backwards=True)) == []
    assert await store.stream_version("nope") == 0


async def test_read_stream_from_version_backwards_and_limit(open_store: Any) -> None:
    async with open_store(batch_size=3) as store:
        await store.append("s", [Deposited(amount=i) for i in range(1, 11)])
        await store.append("other", [Note(text="noise")])
        forward = await collect(store.read_stream("s"))
        assert [r.event.amount for r in forward] == list(range(1, 11))
        assert [r.version for r in await collect(store.read_stream("s", 4))] == list(range(4, 11))
        assert [r.version for r in await collect(store.read_stream("s", 4, limit=5))] == [
            4,
            5,
            6,
            7,
            8,
        ]
        back = await collect(store.read_stream("s", backwards=True))
        assert [r.version for r in back] == list(range(10, 0, -1))
        assert [
            r.version for r in await collect(store.read_stream("s", 7, backwards=True, limit=4))
        ] == [7, 6, 5, 4]
        assert await collect(store.read_stream("s", 11)) == []
        assert [r.version for r in await collect(store.read_stream("s", 1, backwards=True))] == [1]


async def test_read_all_in_position_order_after_and_limit(open_store: Any) -> None:
    async with open_store(batch_size=4) as store:
        for i in range(1, 11):
            await store.append(f"s-{i % 3}", [Deposited(amount=i)])
        everything = await collect(store.read_all())
        assert [r.position for r in everything] == list(range(1, 11))
        assert [r.event.amount for r in everything] == list(range(1, 11))
        assert [r.position for r in await collect(store.read_all(after=7))] == [8, 9, 10]
        assert [r.position for r in await collect(store.read_all(after=2, limit=5))] == [
            3,
            4,
            5,
            6,
            7,
        ]
        assert await collect(store.read_all(after=10)) == []


async def test_read_all_filters_by_type(open_store: Any) -> None:
    async with open_store(batch_size=2) as store:
        for i in range(12):
            event: Event = Note(text=str(i)) if i % 4 else Deposited(amount=i)
            await store.append("mixed", [event])
        deposits = await collect(store.read_all(types=[Deposited]))
        assert [r.event.amount for r in deposits] == [0, 4, 8]
        by_name = await collect(store.read_all(types=["test.account.deposited"]))
        assert [r.position for r in by_name] == [r.position for r in deposits]
        assert [r.position for r in await collect(store.read_all(after=5, types=[Deposited]))] == [
            9
        ]
        assert await collect(store.read_all(types=["test.no.such.type"])) == []


async def test_stream_version_streams_and_last_position(open_store: Any) -> None:
    async with open_store(batch_size=2) as store:
        assert await store.last_position() == 0
        assert await collect(store.streams()) == []
        await store.append("b", [Note(text="1"), Note(text="2")])
        await store.append("a", [Note(text="3")])
        await store.append("c", [Note(text="4")])
        assert await store.stream_version("b") == 2
        assert await collect(store.streams()) == [("a", 1), ("b", 2), ("c", 1)]
        assert (await collect(store.streams()))[0].stream_id == "a"
        assert await store.last_position() == 4


# -- expected versions ----------------------------------------------------------------------


async def test_expected_version_rules(store: tidings.EventStore) -> None:
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("s", [Note(text="x")], expected_version=STREAM_EXISTS)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s", STREAM_EXISTS, 0)
    with pytest.raises(WrongExpectedVersion):
        await store.append("s", [Note(text="x")], expected_version=1)
    assert (await store.append("s", [Note(text="a")], expected_version=NO_STREAM)).version == 1
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("s", [Note(text="b")], expected_version=NO_STREAM)
    assert (info.value.expected, info.value.actual) == (0, 1)
    assert (await store.append("s", [Note(text="b")], expected_version=STREAM_EXISTS)).version == 2
    assert (await store.append("s", [Note(text="c")], expected_version=2)).version == 3
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("s", [Note(text="d")], expected_version=2)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s", 2, 3)
    assert "expected version 2" in str(info.value) and "actual version 3" in str(info.value)
    assert (await store.append("s", [Note(text="d")], expected_version=ANY)).version == 4
    assert [r.event.text for r in await collect(store.read_stream("s"))] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("bad", [-1, 1.0, "1", True, None])
async def test_invalid_expected_version_argument(store: tidings.EventStore, bad: Any) -> None:
    with pytest.raises(InvalidExpectedVersion) as info:
        await store.append("s", [Note(text="x")], expected_version=bad)
    assert isinstance(info.value, TypeError) and isinstance(info.value, TidingsError)
    assert await store.last_position() == 0


async def test_twenty_concurrent_writers_one_winner_per_version(store: tidings.EventStore) -> None:
    writers, rounds = 20, 5
    wins: list[int] = []
    losses: list[WrongExpectedVersion] = []
    barrier = asyncio.Barrier(writers)

    async def writer(name: int) -> None:
        for _ in range(rounds):
            version = await store.stream_version("contested")
            await barrier.wait()  # all twenty saw the same version; now they race
            try:
                result = await store.append(
                    "contested", [Note(text=f"w{name}")], expected_version=version
                )
            except WrongExpectedVersion as exc:
                assert exc.stream_id == "contested" and exc.expected == version
                assert exc.actual == version + 1  # the loser is told the stream moved on
                losses.append(exc)
            else:
                assert result.version == version + 1
                wins.append(result.version)
            await barrier.wait()

    await asyncio.gather(*(writer(i) for i in range(writers)))
    stored = await collect(store.read_stream("contested"))
    assert sorted(wins) == list(range(1, rounds + 1))  # exactly one winner per version
    assert [r.version for r in stored] == list(range(1, rounds + 1))  # versions 1..N, no gap
    assert len(losses) == (writers - 1) * rounds  # every loser was told why
    assert [r.position for r in await collect(store.read_all())] == list(range(1, rounds + 1))


async def test_concurrent_appends_fail_alone(store: tidings.EventStore) -> None:
    await store.append("base", [Note(text="0")])
    good = [
        store.append(f"good-{i}", [Note(text=str(i))], expected_version=NO_STREAM)
        for i in range(30)
    ]
    bad = [store.append("base", [Note(text="late")], expected_version=5) for _ in range(30)]
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    assert all(isinstance(r, tidings.AppendResult) for r in results[:30])
    assert all(isinstance(r, WrongExpectedVersion) for r in results[30:])
    assert await store.last_position() == 31
    assert sorted(r.position for r in results[:30]) == list(range(2, 32))  # type: ignore[union-attr]


# -- idempotent retries ----------------------------------------------------------------------


async def test_reappending_stored_events_is_a_no_op(store: tidings.EventStore) -> None:
    events = [Opened(owner="ada"), Deposited(amount=5)]
    original = await store.append("acc", events, expected_version=NO_STREAM)
    await store.append("acc", [Deposited(amount=7)])
    again = await store.append("acc", events, expected_version=NO_STREAM)  # stale: still a retry
    assert again == original
    assert await store.append("acc", events) == original
    assert await store.stream_version("acc") == 3
    assert await store.last_position() == 3


async def test_reused_event_ids_that_are_not_a_retry_conflict(store: tidings.EventStore) -> None:
    first, second = Note(text="1"), Note(text="2")
    await store.append("a", [first, second])
    with pytest.raises(EventIdConflict) as info:
        await store.append("b", [first])  # one fact, two streams
    assert info.value.stream_id == "b"
    with pytest.raises(EventIdConflict):
        await store.append("a", [first, Note(text="new")])  # only part of the original
    with pytest.raises(EventIdConflict):
        await store.append("a", [second, first])  # not in the original order
    twice = Note(text="twice")
    with pytest.raises(EventIdConflict):
        await store.append("c", [twice, twice])
    assert await store.last_position() == 2
    assert await collect(store.streams()) == [("a", 2)]


async def test_copy_with_new_id_is_a_new_fact(store: tidings.EventStore) -> None:
    event = Note(text="same")
    await store.append("a", [event])
    await store.append("a", [event.model_copy().with_id(tidings.uuid7())])
    assert await store.stream_version("a") == 2


# -- bad input ------------------------------------------------------------------------------


class AbstractBase(Event):
    """No `type=`: an abstract base, not storable."""


@pytest.mark.parametrize(
    "bad_events",
    [
        [{"type": "test.note", "text": "dict"}],
        [Note(text="ok"), None],
        [Note(text="ok"), "text"],
        [AbstractBase()],
    ],
)
async def test_non_events_are_rejected_and_nothing_is_written(
    store: tidings.EventStore, bad_events: list[Any]
) -> None:
    with pytest.raises(NotAnEvent) as info:
        await store.append("s", bad_events)
    assert isinstance(info.value, TidingsError) and isinstance(info.value, TypeError)
    assert info.value.index == len(bad_events) - 1
    assert await store.last_position() == 0


async def test_any_iterable_of_events_is_accepted(store: tidings.EventStore) -> None:
    result = await store.append("s", (Note(text=str(i)) for i in range(3)))
    assert (result.version, result.position) == (3, 3)
    assert [r.event.text async for r in store.read_stream("s")] == ["0", "1", "2"]


async def test_a_single_event_or_empty_list_is_rejected(store: tidings.EventStore) -> None:
    for bad in (Note(text="not in a list"), [], "text", None, {"text": "x"}, iter([])):
        with pytest.raises(InvalidEvents) as info:
            await store.append("s", bad)  # type: ignore[arg-type]
        assert isinstance(info.value, TidingsError) and isinstance(info.value, TypeError)
    assert await store.last_position() == 0


@pytest.mark.parametrize("bad", [{"user": 7}, {3: "x"}, ["correlation_id"], "corr"])
async def test_bad_metadata_is_rejected(store: tidings.EventStore, bad: Any) -> None:
    with pytest.raises(InvalidMetadata) as info:
        await store.append("s", [Note(text="x")], metadata=bad)
    assert isinstance(info.value, TidingsError) and isinstance(info.value, TypeError)
    assert await store.last_position() == 0


@pytest.mark.parametrize(
    ("stream_id", "kind"),
    [
        ("", ValueError),
        ("x" * 513, ValueError),
        (None, TypeError),
        (42, TypeError),
        ("\udc80", ValueError),
    ],
)
async def test_bad_stream_ids_are_rejected(
    store: tidings.EventStore, stream_id: Any, kind: type
) -> None:
    with pytest.raises(InvalidStreamId) as info:
        await store.append(stream_id, [Note(text="x")])
    assert isinstance(info.value, TidingsError)
    assert isinstance(info.value, ValueError)  # InvalidStreamId is a ValueError in every case
    assert isinstance(info.value, kind)
    with pytest.raises(InvalidStreamId):
        await store.stream_version(stream_id)
    with pytest.raises(InvalidStreamId):
        await collect(store.read_stream(stream_id))
    assert await store.last_position() == 0


async def test_stream_id_of_512_characters_is_fine(store: tidings.EventStore) -> None:
    await store.append("é" * 512, [Note(text="x")])
    assert await store.stream_version("é" * 512) == 1


async def test_oversized_event_is_rejected_and_nothing_written(store: tidings.EventStore) -> None:
    big = Note(text="x" * (1024 * 1024))
    with pytest.raises(EventTooLarge) as info:
        await store.append("s", [Note(text="small"), big])
    assert isinstance(info.value, ValueError) and isinstance(info.value, TidingsError)
    assert (info.value.index, info.value.limit) == (1, 1024 * 1024)
    assert info.value.size > info.value.limit
    assert await store.last_position() == 0
    await store.append("s", [Note(text="x" * (1024 * 1024 - 20))])  # just under: fine


async def test_metadata_counts_towards_the_size_limit(open_store: Any) -> None:
    async with open_store(max_event_size=200) as store:
        with pytest.raises(EventTooLarge):
            await store.append("s", [Note(text="small")], metadata={"blob": "m" * 200})
        assert await store.last_position() == 0


async def test_metadata_in_its_stored_form_is_accepted(store: tidings.EventStore) -> None:
    await store.append(
        "s", [Note(text="x")], metadata={"correlation_id": "c", "headers": {"a": "b"}}
    )
    (record,) = [r async for r in store.read_stream("s")]
    assert record.metadata == Metadata("c", None, {"a": "b"})


async def test_event_size_limit_is_configurable(open_store: Any) -> None:
    async with open_store(max_event_size=100) as store:
        with pytest.raises(EventTooLarge):
            await store.append("s", [Note(text="y" * 100)])
        await store.append("s", [Note(text="y" * 50)])
        assert await store.stream_version("s") == 1


STREAM_IDS = [
    "it's",
    'say "hi"',
    "100%",
    "a;DROP TABLE tidings_events;--",
    "back\\slash",
    "名前",
    "ümlaut",
    "emoji-🎉",
    "tab\tnew\nline",
    "nul\x00byte",
    " spaced ",
    "%s%d",
    "?",
]


async def test_stream_ids_are_data(store: tidings.EventStore) -> None:
    for i, stream_id in enumerate(STREAM_IDS):
        await store.append(stream_id, [Note(text=str(i))], expected_version=NO_STREAM)
    for i, stream_id in enumerate(STREAM_IDS):
        records = await collect(store.read_stream(stream_id))
        assert [(r.stream_id, r.event.text) for r in records] == [(stream_id, str(i))]
        assert await store.stream_version(stream_id) == 1
    assert sorted(s.stream_id for s in await collect(store.streams())) == sorted(STREAM_IDS)
    assert {r.stream_id for r in await collect(store.read_all())} == set(STREAM_IDS)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream_id=st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40))
async def test_any_unicode_stream_id_round_trips(store: tidings.EventStore, stream_id: str) -> None:
    before = await store.stream_version(stream_id)
    await store.append(stream_id, [Note(text=stream_id)], expected_version=before)
    records = await collect(store.read_stream(stream_id, backwards=True, limit=1))
    assert records[0].stream_id == stream_id and records[0].event.text == stream_id
    assert records[0].version == before + 1


async def test_undecodable_row_names_stream_version_and_position(store: tidings.EventStore) -> None:
    private = TypeRegistry()

    class Secret(Event, type="test.secret", registry=private):
        value: int

    class SecretChanged(Event, type="test.secret", registry=TypeRegistry()):
        value: str
        renamed: bool  # required field the stored data lacks

    store.codec = JSONCodec(private)  # type: ignore[attr-defined]
    await store.append("vault", [Secret(value=1)])
    await store.append("vault", [Secret(value=2)])
    store.codec = JSONCodec()  # type: ignore[attr-defined]  # a reader that never imported Secret
    with pytest.raises(EventDecodeError) as info:
        await collect(store.read_stream("vault"))
    assert (info.value.stream_id, info.value.version, info.value.position) == ("vault", 1, 1)
    assert "vault" in str(info.value) and "test.secret" in str(info.value)
    store.codec = JSONCodec(SecretChanged.__event_registry__)  # type: ignore[attr-defined]
    with pytest.raises(EventDecodeError) as info:
        await collect(store.read_all(after=1))
    assert (info.value.stream_id, info.value.version, info.value.position) == ("vault", 2, 2)
    assert isinstance(info.value, ValueError)
    store.codec = JSONCodec(keep_unknown=True)  # type: ignore[attr-defined]
    raw = await collect(store.read_stream("vault"))
    assert [r.event for r in raw] == [
        UnknownEvent(type="test.secret", version=1, data={"value": 1}),
        UnknownEvent(type="test.secret", version=1, data={"value": 2}),
    ]


# -- subscriptions ----------------------------------------------------------------------------


async def test_subscribe_catches_up_then_receives_new_events(store: tidings.EventStore) -> None:
    await store.append("s", [Note(text="1"), Note(text="2")])
    received: list[int] = []

    async def follow() -> None:
        async for record in store.subscribe(after=1):
            received.append(record.position)
            if record.position == 5:
                return

    task = asyncio.create_task(follow())
    for _ in range(500):  # caught up: it has the old event and now waits
        if received:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)
    assert received == [2]
    await store.append("s", [Note(text="3")])
    await store.append("t", [Note(text="4"), Note(text="5")])
    await asyncio.wait_for(task, timeout=5)
    assert received == [2, 3, 4, 5]


async def test_subscribe_with_type_filter_and_concurrent_writers(store: tidings.EventStore) -> None:
    total = 60
    seen: list[int] = []

    async def follow() -> None:
        async for record in store.subscribe(types=[Deposited]):
            seen.append(record.event.amount)
            if len(seen) == total // 2:
                return

    task = asyncio.create_task(follow())

    async def write(i: int) -> None:
        await store.append(f"w-{i % 7}", [Deposited(amount=i) if i % 2 == 0 else Note(text=str(i))])

    await asyncio.gather(*(write(i) for i in range(total)))
    await asyncio.wait_for(task, timeout=5)
    assert sorted(seen) == list(range(0, total, 2))
    assert len(set(seen)) == len(seen)


async def test_idle_subscriber_does_not_spin(store: tidings.EventStore) -> None:
    async def follow() -> None:
        async for _ in store.subscribe():
            pass

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    import time

    cpu = time.process_time()
    await asyncio.sleep(0.5)
    used = time.process_time() - cpu
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert used < 0.25, f"an idle subscriber used {used:.2f}s of CPU in 0.5s"


# -- lifecycle and memory -------------------------------------------------------------------


async def test_closed_or_unopened_store_refuses_work(store_url: str) -> None:
    store = tidings.open_store(store_url)
    with pytest.raises(StoreClosed):
        await store.append("s", [Note(text="x")])
    async with store:
        await store.append("s", [Note(text="x")])
    with pytest.raises(StoreClosed):
        await store.append("s", [Note(text="y")])
    with pytest.raises(StoreClosed):
        await collect(store.read_all())


async def test_reading_streams_in_constant_memory(open_store: Any) -> None:
    async with open_store(batch_size=200) as store:
        payload = "p" * 200

        async def peak_while_reading(count: int) -> int:
            gc.collect()
            tracemalloc.start()
            seen = 0
            async for record in store.read_all(limit=count):
                seen += record.position > 0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert seen == count
            return peak

        for chunk in range(20):
            await store.append(f"s-{chunk}", [Note(text=payload) for _ in range(500)])
        small = await peak_while_reading(1_000)
        large = await peak_while_reading(10_000)
        assert large < small * 2 + 200_000, (small, large)


async def test_waiting_subscriber_is_told_when_the_store_closes(store_url: str) -> None:
    store = tidings.open_store(store_url)
    await store.open()
    await store.append("s", [Note(text="1")])
    seen: list[int] = []

    async def follow() -> None:
        async for record in store.subscribe():
            seen.append(record.position)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    await store.aclose()
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(task, timeout=5)
    assert seen == [1]


async def test_read_correlation_returns_one_requests_events_in_order(
    store: tidings.EventStore,
) -> None:
    with tidings.correlate("req-a"):
        await store.append("acct-1", [Opened(owner="a")])
    with tidings.correlate("req-b"):
        await store.append("acct-2", [Opened(owner="b")])
    await store.append("acct-3", [Opened(owner="c")])  # no correlation at all
    with tidings.correlate("req-a"):
        await store.append("acct-1", [Deposited(amount=5), Withdrew(amount=1)])
    found = await store.read_correlation("req-a")  # type: ignore[attr-defined]
    assert [(r.stream_id, r.version) for r in found] == [
        ("acct-1", 1),
        ("acct-1", 2),
        ("acct-1", 3),
    ]
    assert [r.position for r in found] == sorted(r.position for r in found)
    assert len(await store.read_correlation("req-a", limit=2)) == 2  # type: ignore[attr-defined]
    assert await store.read_correlation("req-zzz") == []  # type: ignore[attr-defined]
