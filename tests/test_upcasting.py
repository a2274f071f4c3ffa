"""Upcasters: stored v1 events arrive as v3 wherever events are decoded, renames included,
and a gap in a chain fails when the store or broker opens."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tidings
from tidings import (
    Aggregate,
    Context,
    JSONCodec,
    Metadata,
    Projection,
    ProjectionRunner,
    ReadModel,
    Repository,
    Service,
    TypeRegistry,
    UpcasterGap,
    on,
    open_broker,
    open_store,
    upcaster,
)

# -- yesterday's code: what is in the store ---------------------------------------------------

OLD = TypeRegistry()


class DepositedV1(tidings.Event, type="test.up.deposited", version=1, registry=OLD):
    amount: int  # whole euros


class CreditedV1(tidings.Event, type="test.up.credited", version=1, registry=OLD):
    cents: int  # an old name for a deposit


# -- today's code: v3, two upcasters, and a rename ---------------------------------------------

NEW = TypeRegistry()


class Deposited(tidings.Event, type="test.up.deposited", version=3, registry=NEW):
    amount_cents: int
    currency: str


@upcaster("test.up.deposited", from_version=1, registry=NEW)
def to_cents(data: dict[str, Any]) -> dict[str, Any]:
    return {"amount_cents": data["amount"] * 100}


@upcaster("test.up.deposited", from_version=2, registry=NEW)
def add_currency(data: dict[str, Any], metadata: Metadata) -> dict[str, Any]:
    return {**data, "currency": metadata.headers.get("currency", "EUR")}


@upcaster("test.up.credited", from_version=1, to_type="test.up.deposited", registry=NEW)
def renamed(data: dict[str, Any]) -> dict[str, Any]:
    return {"amount_cents": data["cents"]}  # to test.up.deposited v2, then on to v3


class Wallet(Aggregate, category="wallet"):
    cents: int = 0

    @on(Deposited)
    def _deposited(self, event: Deposited) -> None:
        self.cents += event.amount_cents


class Totals(Projection, name="test_up_totals"):
    @on(Deposited)
    def deposited(self, event: Deposited, record: tidings.RecordedEvent[Any]) -> None:
        total = self.view.get(record.stream_id, {"cents": 0, "currencies": []})
        self.view.put(
            record.stream_id,
            {"cents": total["cents"] + event.amount_cents, "currencies": [event.currency]},
        )


async def _old_events(url: str) -> None:
    async with open_store(url, codec=JSONCodec(OLD)) as store:
        await store.append("wallet-1", [DepositedV1(amount=2)])
        await store.append("wallet-1", [CreditedV1(cents=50)], metadata={"currency": "CHF"})


def _expected(events: list[tidings.Event]) -> None:
    assert all(isinstance(e, Deposited) for e in events)
    assert [(e.amount_cents, e.currency) for e in events] == [(200, "EUR"), (50, "CHF")]  # type: ignore[attr-defined]


async def test_stored_v1_events_arrive_as_v3_in_every_store_read_path(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    await _old_events(url)
    async with open_store(url, codec=JSONCodec(NEW)) as store:
        stream = [r async for r in store.read_stream("wallet-1")]
        _expected([r.event for r in stream])
        assert {(r.type, r.schema_version) for r in stream} == {("test.up.deposited", 3)}
        _expected([r.event async for r in store.read_all()])
        seen = []
        async for record in store.subscribe():
            seen.append(record.event)
            if len(seen) == 2:
                break
        _expected(seen)
        assert (await Repository(store, Wallet).get("1")).cents == 250  # aggregate loading
        async with ProjectionRunner(store, [Totals()]) as runner:
            await runner.wait_for(await store.last_position())
        assert await ReadModel(store, Totals).get("wallet-1") == {
            "cents": 250,
            "currencies": ["CHF"],
        }


async def test_old_messages_arrive_upcast_at_consumers_and_after_a_dead_letter_replay() -> None:
    async with open_broker("memory://") as broker:
        await broker.declare("money", "svc")
        await broker.publish("money", DepositedV1(amount=3))
        await broker.publish("money", CreditedV1(cents=70), metadata={"currency": "GBP"})
        service = Service("svc", broker, registry=NEW)
        got: list[Deposited] = []
        failed_once: list[int] = []

        @service.handler("money", retry=tidings.Retry(attempts=1))
        async def handle(event: Deposited, ctx: Context) -> None:
            if event.amount_cents == 70 and not failed_once:
                failed_once.append(1)
                raise RuntimeError("down for a moment")  # dead-lettered, replayed below
            got.append(event)

        runner = asyncio.create_task(service.run())
        for _ in range(100):
            if len(got) == 1 and failed_once and await broker.dead_letters():
                break
            await asyncio.sleep(0.02)
        [dead] = await broker.dead_letters()
        assert dead.message.attributes["schemaversion"] == 1  # kept as it was published
        await broker.replay(dead.id)
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.02)
        service.stop()
        await asyncio.wait_for(runner, 5)
    assert [(e.amount_cents, e.currency) for e in got] == [(300, "EUR"), (70, "GBP")]


async def test_a_gap_in_a_chain_fails_when_the_store_or_broker_opens(tmp_path: Path) -> None:
    gapped = TypeRegistry()

    class Paid(tidings.Event, type="test.up.paid", version=3, registry=gapped):
        cents: int

    @upcaster("test.up.paid", from_version=1, registry=gapped)  # to v2: no class, no step
    def one(data: dict[str, Any]) -> dict[str, Any]:
        return data

    with pytest.raises(UpcasterGap, match=r"test\.up\.paid v1 cannot be read.*v2"):
        await open_store("memory://", codec=JSONCodec(gapped)).open()
    with pytest.raises(UpcasterGap, match=r"test\.up\.paid"):
        await open_broker("memory://", codec=JSONCodec(gapped)).open()

    holes = TypeRegistry()

    class Fee(tidings.Event, type="test.up.fee", version=3, registry=holes):
        cents: int

    @upcaster("test.up.fee", from_version=2, registry=holes)
    def two(data: dict[str, Any]) -> dict[str, Any]:
        return data

    class FeeV1(tidings.Event, type="test.up.fee", version=1, registry=holes):
        euros: int

    with pytest.raises(UpcasterGap, match=r"test\.up\.fee: no upcaster from v1 to v2"):
        holes.check()


def test_upcaster_definitions_are_checked() -> None:
    registry = TypeRegistry()
    with pytest.raises(tidings.ConfigurationError, match="later version"):
        upcaster("a.b", from_version=2, to_version=2, registry=registry)
    with pytest.raises(tidings.ConfigurationError, match=r"\(data\) or \(data, metadata\)"):

        @upcaster("a.b", from_version=1, registry=registry)
        def three(a: Any, b: Any, c: Any) -> dict[str, Any]:
            return {}

    @upcaster("a.b", from_version=1, registry=registry)
    def first(data: dict[str, Any]) -> dict[str, Any]:
        return data

    with pytest.raises(tidings.EventDefinitionError, match="already has the upcaster"):

        @upcaster("a.b", from_version=1, registry=registry)
        def second(data: dict[str, Any]) -> dict[str, Any]:
            return data


@settings(max_examples=200, deadline=None)
@given(amount=st.integers(min_value=-(10**12), max_value=10**12), currency=st.text(max_size=8))
def test_any_v1_data_round_trips_through_the_codec_and_the_upcasters(
    amount: int, currency: str
) -> None:
    old, new = JSONCodec(OLD), JSONCodec(NEW)
    encoded = old.encode(DepositedV1(amount=amount))
    meta = Metadata(headers={"currency": currency}) if currency else Metadata()
    event = new.decode_event(encoded.type, encoded.schema_version, encoded.data, meta)
    assert event == Deposited(amount_cents=amount * 100, currency=currency or "EUR")
    again = new.encode(event)  # and the newest version round-trips as itself
    assert new.decode_event(again.type, again.schema_version, again.data) == event


async def test_unknown_types_raise_by_default_and_arrive_raw_when_asked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    stranger = TypeRegistry()

    class Stranger(tidings.Event, type="test.up.stranger", registry=stranger):
        name: str

    async with open_store(url, codec=JSONCodec(stranger)) as store:
        await store.append("wallet-9", [Stranger(name="x")])
    async with open_store(url, codec=JSONCodec(NEW)) as store:
        with pytest.raises(tidings.EventDecodeError, match=r"test\.up\.stranger"):
            [r async for r in store.read_all()]
        with pytest.raises(tidings.EventDecodeError):
            await Repository(store, Wallet).get("9")  # aggregates: an error, always
        [raw] = [r.event async for r in store.read_all(keep_unknown=True)]
        assert isinstance(raw, tidings.UnknownEvent)
        assert (raw.type, raw.version, raw.data) == ("test.up.stranger", 1, {"name": "x"})
        [again] = [r.event async for r in store.read_stream("wallet-9", keep_unknown=True)]
        assert again == raw
        async for record in store.subscribe(keep_unknown=True):
            assert record.event == raw
            break
