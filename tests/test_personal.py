"""Personal data: fields stored encrypted per data subject; after `store.forget(subject)` no
read path returns them in clear, and the database file holds no copy."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Annotated, Any

import pytest
from typer.testing import CliRunner

import tidings
from tests.backends import STORE_BACKENDS, discard, require, store_url
from tidings import (
    REDACTED,
    Context,
    JSONCodec,
    OutboxRelay,
    Personal,
    Projection,
    ProjectionRunner,
    ReadModel,
    Service,
    TypeRegistry,
    on,
    open_broker,
    open_store,
)
from tidings.brokers import BrokerBase
from tidings.cli.main import app

PEOPLE = TypeRegistry()
EMAIL = "ada.lovelace@example.com"


class Registered(tidings.Event, type="test.pii.registered", registry=PEOPLE):
    customer_id: str
    email: Annotated[str, Personal(subject="customer_id")]
    nickname: Annotated[str | None, Personal(subject="customer_id")] = None
    plan: str


class Contacts(Projection, name="test_pii_contacts"):
    @on(Registered)
    def registered(self, event: Registered, record: tidings.RecordedEvent[Any]) -> None:
        self.view.put(event.customer_id, {"email": event.email, "plan": event.plan})


@pytest.fixture(params=STORE_BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "postgres":
        require("postgres")
    made = store_url(request.param, tmp_path)
    yield made
    discard(made)


async def test_forget_redacts_every_read_path_and_keeps_the_event(url: str) -> None:
    async with open_store(url, codec=JSONCodec(PEOPLE)) as store:
        await store.append("customer-c1", [Registered(customer_id="c1", email=EMAIL, plan="pro")])
        await store.append(
            "customer-c2", [Registered(customer_id="c2", email="b@x.org", nickname="b", plan="")]
        )
        [first] = [r async for r in store.read_stream("customer-c1")]
        assert first.event.email == EMAIL  # readable while the key exists
        await store.forget("c1")
        records = [r async for r in store.read_all()]
        assert [r.event.email for r in records] == [REDACTED, "b@x.org"]
        assert records[0].event.plan == "pro" and records[0].version == 1  # the rest stays
        assert records[1].event.nickname == "b"
        async for record in store.subscribe():
            assert record.event.email == REDACTED
            break
        async with ProjectionRunner(store, [Contacts()]) as runner:
            await runner.wait_for(await store.last_position())
        assert await ReadModel(store, Contacts).get("c1") == {"email": REDACTED, "plan": "pro"}
        raw = [r async for r in store.read_all(keep_unknown=True)]
        assert all(EMAIL not in str(r.event) for r in raw)


async def test_published_events_carry_personal_fields_redacted_or_sealed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    async with (
        open_store(url, codec=JSONCodec(PEOPLE)) as store,
        open_broker("memory://") as broker,
    ):
        await store.append("customer-c1", [Registered(customer_id="c1", email=EMAIL, plan="pro")])
        await broker.declare("typed", "g")
        await broker.declare("raw", "g")
        await OutboxRelay(store, broker, "typed", name="typed").catch_up()
        raw_store = open_store(url, codec=JSONCodec(TypeRegistry(), keep_unknown=True))
        async with raw_store:
            await OutboxRelay(raw_store, broker, "raw", name="raw").catch_up()
        for topic in ("typed", "raw"):
            got = await _first(broker, topic)
            assert got.email == REDACTED and got.plan == "pro"  # no key leaves the store


async def _first(broker: BrokerBase, topic: str) -> Registered:
    service = Service("g", broker, registry=PEOPLE)
    got: list[Registered] = []

    @service.handler(topic)
    async def handle(event: Registered, ctx: Context) -> None:
        assert EMAIL.encode() not in ctx.delivery.message.data
        got.append(event)
        service.stop()

    await asyncio.wait_for(service.run(), 5)
    return got[0]


def test_after_forget_the_database_file_and_the_cli_hold_no_clear_copy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    secret = f"{uuid.uuid4().hex}@example.com"
    asyncio.run(_register_and_forget(url, secret))
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("events"))
    assert secret.encode() not in on_disk
    result = CliRunner().invoke(app, ["events", "customer-c1", "--json", "--store", url])
    assert result.exit_code == 0, result.output
    assert secret not in result.stdout and "c1" in result.stdout


async def _register_and_forget(url: str, secret: str) -> None:
    async with open_store(url, codec=JSONCodec(PEOPLE)) as store:
        await store.append("customer-c1", [Registered(customer_id="c1", email=secret, plan="pro")])
        async with ProjectionRunner(store, [Contacts()]) as runner:
            await runner.wait_for(1)
        assert (await ReadModel(store, Contacts).get("c1"))["email"] == secret
        await store.forget("c1")
        async with ProjectionRunner(store, [Contacts()]) as runner:
            await runner.rebuild("test_pii_contacts")  # read models copied it: rebuild them
        assert (await ReadModel(store, Contacts).get("c1"))["email"] == REDACTED


def test_personal_fields_are_checked_when_the_class_is_declared() -> None:
    registry = TypeRegistry()
    with pytest.raises(tidings.EventDefinitionError, match="must be a str"):

        class Bad(tidings.Event, type="test.pii.bad", registry=registry):
            customer_id: str
            age: Annotated[int, Personal(subject="customer_id")]

    with pytest.raises(tidings.EventDefinitionError, match="another, non-personal field"):

        class Orphan(tidings.Event, type="test.pii.orphan", registry=registry):
            email: Annotated[str, Personal(subject="customer")]


async def test_text_that_looks_sealed_is_left_alone() -> None:
    lookalike = "tidings:pii:v1:YzE=:AAAA"  # in an ordinary field, and in a personal one
    async with open_store("memory://", codec=JSONCodec(PEOPLE)) as store:
        await store.append(
            "customer-c1", [Registered(customer_id="c1", email=lookalike, plan=lookalike)]
        )
        [record] = [r async for r in store.read_all()]
    assert record.event.plan == lookalike  # not personal: data, whatever it looks like
    assert record.event.email == lookalike  # personal: sealed on write, opened on read
