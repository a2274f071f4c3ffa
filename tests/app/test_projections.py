"""Projections on every store: catch-up, live runs, read-your-writes, atomic checkpoints,
errors, status and blue/green rebuilds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.app.domain import Account, AccountOpened, Closed, Deposited, Withdrew
from tidings import (
    EventStore,
    Projection,
    ProjectionError,
    ProjectionRunner,
    ReadModel,
    RecordedEvent,
    Repository,
    on,
    projection_status,
)
from tidings.store.base import ProjectionConflict, StoreBase


class Balances(Projection, name="balances"):
    """Per account: balance and the number of events applied."""

    @on(AccountOpened)
    def opened(self, event: AccountOpened, record: RecordedEvent[Any]) -> None:
        self.view.put(record.stream_id, {"owner": event.owner, "balance": 0, "events": 1})

    @on(Deposited, Withdrew)
    def moved(self, event: Deposited | Withdrew, record: RecordedEvent[Any]) -> None:
        doc = self.view.get(record.stream_id)
        sign = 1 if isinstance(event, Deposited) else -1
        doc["balance"] += sign * event.amount
        doc["events"] += 1
        self.view.put(record.stream_id, doc)

    @on(Closed)
    def closed(self, event: Closed, record: RecordedEvent[Any]) -> None:
        self.view.delete(record.stream_id)


class OwnersAsync(Projection):
    """An async handler, and the default name."""

    @on(AccountOpened)
    async def opened(self, event: AccountOpened, record: RecordedEvent[Any]) -> None:
        await asyncio.sleep(0)
        self.view.put(event.owner, record.stream_id)


async def write_accounts(store: EventStore, count: int = 5, prefix: str = "a") -> int:
    repo = Repository(store, Account)
    position = 0
    for n in range(count):
        account = Account.open(f"{prefix}{n}", f"owner{n}")
        account.deposit(100 + n)
        account.withdraw(10)
        result = await repo.save(account)
        assert result is not None
        position = result.position
    return position


async def test_catch_up_builds_the_read_model(store: EventStore) -> None:
    head = await write_accounts(store)
    runner = ProjectionRunner(store, [Balances(), OwnersAsync()])
    assert OwnersAsync.name == "owners_async"
    assert await runner.catch_up() == head
    balances = await ReadModel(store, Balances).all()
    assert balances["account-a3"] == {"owner": "owner3", "balance": 93, "events": 3}
    assert len(balances) == 5
    assert await ReadModel(store, "owners_async").get("owner4") == "account-a4"
    assert await runner.read_model(Balances).get("missing", "default") == "default"
    state = await store.projection_state("balances")  # type: ignore[attr-defined]
    assert state.position == head and state.generation == 1


async def test_catch_up_resumes_from_the_checkpoint(store: EventStore) -> None:
    await write_accounts(store, 2)
    await ProjectionRunner(store, [Balances()]).catch_up()
    repo = Repository(store, Account)
    await repo.update("a0", lambda a: a.deposit(1))
    await ProjectionRunner(store, [Balances()]).catch_up()  # a new runner: from the checkpoint
    assert (await ReadModel(store, Balances).get("account-a0"))["balance"] == 91
    assert (await ReadModel(store, Balances).get("account-a0"))["events"] == 4


async def test_wait_for_gives_read_your_writes(store: EventStore) -> None:
    repo = Repository(store, Account)
    async with ProjectionRunner(store, [Balances()]) as runner:
        for n in range(20):
            account = Account.open(f"live{n}", "ann")
            account.deposit(n)
            result = await repo.save(account)
            assert result is not None
            await runner.wait_for(result.position)
            assert (await runner.read_model(Balances).get(f"account-live{n}"))["balance"] == n


async def test_wait_for_times_out_naming_the_lag(store: EventStore) -> None:
    runner = ProjectionRunner(store, [Balances()])
    async with runner:
        with pytest.raises(TimeoutError, match="balances at 0"):
            await runner.wait_for(5, timeout=0.1)


async def test_a_deleted_document_is_gone(store: EventStore) -> None:
    await store.append("account-x", [AccountOpened(owner="ann"), Closed()])
    await ProjectionRunner(store, [Balances()]).catch_up()
    assert await ReadModel(store, Balances).all() == {}


async def test_unhandled_types_are_skipped_and_the_checkpoint_moves_past_them(
    store: EventStore,
) -> None:
    head = await write_accounts(store, 2)
    await ProjectionRunner(store, [OwnersAsync()]).catch_up()
    state = await store.projection_state("owners_async")  # type: ignore[attr-defined]
    assert state.position == head


async def test_a_failing_handler_stops_before_the_event(store: EventStore) -> None:
    class Fragile(Projection):
        @on(Deposited)
        def deposited(self, event: Deposited, record: RecordedEvent[Any]) -> None:
            if event.amount == 102:
                raise ValueError("cannot take 102")
            self.view.put(record.stream_id, event.amount)

    await write_accounts(store, 4)
    runner = ProjectionRunner(store, [Fragile()], batch_size=1)
    with pytest.raises(ProjectionError, match=r"fragile.*test.bank.deposited.*cannot take 102"):
        await runner.catch_up()
    bad = [r async for r in store.read_stream("account-a2")][1]
    good = [r async for r in store.read_stream("account-a1")][1]
    state = await store.projection_state("fragile")  # type: ignore[attr-defined]
    assert good.position <= state.position < bad.position  # all before it, nothing of it
    assert await ReadModel(store, "fragile").all() == {"account-a0": 100, "account-a1": 101}
    async with ProjectionRunner(store, [Fragile()]) as live:
        with pytest.raises(ProjectionError):
            await live.wait_for(bad.position, timeout=5)
        [status] = await live.status()
        assert status.error is not None and "cannot take 102" in status.error


async def test_a_stale_commit_is_refused_and_changes_nothing(store: StoreBase) -> None:
    await store.commit_projection("p", 1, 0, 5, {"k": '"first"'})
    with pytest.raises(ProjectionConflict):
        await store.commit_projection("p", 1, 0, 5, {"k": '"second"', "other": '"x"'})
    assert await ReadModel(store, "p").all() == {"k": "first"}
    state = await store.projection_state("p")
    assert state is not None and state.position == 5


async def test_two_runners_never_apply_an_event_twice(store: EventStore) -> None:
    head = await write_accounts(store, 10)
    first = ProjectionRunner(store, [Balances()], batch_size=2)
    second = ProjectionRunner(store, [Balances()], batch_size=3)
    await asyncio.gather(first.catch_up(), second.catch_up())
    balances = await ReadModel(store, Balances).all()
    assert all(doc["events"] == 3 for doc in balances.values()), balances
    state = await store.projection_state("balances")  # type: ignore[attr-defined]
    assert state.position == head


async def test_status_reports_lag_in_events_and_seconds(store: EventStore) -> None:
    await write_accounts(store, 2)
    await ProjectionRunner(store, [Balances()]).catch_up()
    await asyncio.sleep(0.05)
    await write_accounts(store, 1, prefix="b")  # three more events
    [status] = await projection_status(store)
    assert (status.name, status.lag_events, status.rebuilding) == ("balances", 3, False)
    assert 0 <= status.lag_seconds < 60
    await ProjectionRunner(store, [Balances()]).catch_up()
    [status] = await projection_status(store)
    assert (status.lag_events, status.lag_seconds) == (0, 0.0)


async def test_rebuild_is_blue_green(store: StoreBase) -> None:
    """Queries see the old model until the rebuilt one is swapped in whole."""
    head = await write_accounts(store, 30)
    await ProjectionRunner(store, [Balances()]).catch_up()
    before = await ReadModel(store, Balances).all()

    class BalancesV2(Balances, name="balances"):
        """The same projection, its read model now counting in cents."""

        @on(Deposited, Withdrew)
        def moved(self, event: Deposited | Withdrew, record: RecordedEvent[Any]) -> None:
            super().moved(event, record)
            doc = self.view.get(record.stream_id)
            doc["cents"] = doc["balance"] * 100
            self.view.put(record.stream_id, doc)

    seen_during: list[dict[str, Any]] = []

    def progress(name: str, position: int, target: int) -> None:
        assert (name, target) == ("balances", head)
        seen_during.append({"position": position})

    runner = ProjectionRunner(store, [BalancesV2()], batch_size=10)
    original = runner.store.commit_projection

    async def commit_and_query(*args: Any, **kwargs: Any) -> None:
        await original(*args, **kwargs)
        seen_during.append(await ReadModel(store, "balances").all())

    runner.store.commit_projection = commit_and_query  # type: ignore[method-assign]
    try:
        assert await runner.rebuild("balances", progress=progress) == head
    finally:
        del runner.store.commit_projection
    snapshots = [s for s in seen_during if "position" not in s]
    assert len(snapshots) >= 5 and all(s == before for s in snapshots)  # never half-built
    after = await ReadModel(store, Balances).all()
    assert after["account-a7"]["cents"] == 9700 and len(after) == 30
    state = await store.projection_state("balances")
    assert state is not None
    assert (state.generation, state.position, state.building_generation) == (2, head, None)
    assert [doc async for doc in store.documents("balances", generation=1)] == []


async def test_a_live_runner_follows_a_rebuild(store: StoreBase) -> None:
    await write_accounts(store, 3)
    repo = Repository(store, Account)
    async with ProjectionRunner(store, [Balances()]) as runner:
        await runner.wait_for(await store.last_position())
        await runner.rebuild(Balances)
        result = await repo.update("a1", lambda a: a.deposit(5))
        position = await store.last_position()
        await runner.wait_for(position)
        assert (await runner.read_model(Balances).get("account-a1"))["balance"] == 96
        assert result.version == 4


async def test_an_interrupted_rebuild_leaves_the_live_model_and_can_restart(
    store: StoreBase,
) -> None:
    head = await write_accounts(store, 3)
    await ProjectionRunner(store, [Balances()]).catch_up()
    live = await ReadModel(store, Balances).all()
    started = await store.start_rebuild("balances")
    assert started.building_generation == 2
    await store.commit_projection("balances", 2, 0, 1, {"junk": "1"})  # then the process died
    assert await ReadModel(store, Balances).all() == live
    assert await ProjectionRunner(store, [Balances()]).rebuild("balances") == head
    assert await ReadModel(store, Balances).all() == live  # rebuilt equal, no junk left


async def test_handlers_get_typed_events_whatever_registry_the_store_decodes_with(
    tmp_path: Any,
) -> None:
    """A store reading with another registry hands over `UnknownEvent`s; a handler that
    names the class still gets its typed event, never silently nothing."""
    from tidings import JSONCodec, TypeRegistry, open_store

    async with open_store("memory://", codec=JSONCodec(TypeRegistry(), keep_unknown=True)) as store:
        head = await write_accounts(store, 3)
        assert await ProjectionRunner(store, [Balances()]).catch_up() == head
        balances = await ReadModel(store, Balances).all()
        assert balances["account-a2"] == {"owner": "owner2", "balance": 92, "events": 3}
        account = await Repository(store, Account).get("a1")
        assert account.balance == 91


async def test_run_in_the_foreground_until_a_projection_fails(store: EventStore) -> None:
    class Picky(Projection):
        @on(Withdrew)
        def withdrew(self, event: Withdrew) -> None:
            raise RuntimeError("no withdrawals")

    await write_accounts(store, 1)
    runner = ProjectionRunner(store, Picky())  # one projection, not in a list
    with pytest.raises(ProjectionError, match="no withdrawals"):
        await asyncio.wait_for(runner.run(), timeout=10)
