"""The repository on every store: save, load, conflicts, retries, time travel, snapshots."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.app.domain import Account, AccountOpened, Deposited, InsufficientFunds, Withdrew
from tidings import (
    AggregateNotFound,
    EventStore,
    Repository,
    UnhandledEvent,
    WrongExpectedVersion,
)
from tidings.store.base import StoreBase


async def seed_story(repo: Repository[Account], account_id: str = "acc-1") -> Account:
    """The seed's ledger: opened, deposited 100, withdrew 30, deposited 50."""
    account = Account.open(account_id, "ann")
    account.deposit(100)
    await repo.save(account)
    account.withdraw(30)
    await repo.save(account)
    account.deposit(50)
    await repo.save(account)
    return account


async def test_save_then_get(store: EventStore) -> None:
    repo = Repository(store, Account)
    await seed_story(repo)
    loaded = await repo.get("acc-1")
    assert (loaded.id, loaded.version, loaded.owner, loaded.balance) == ("acc-1", 4, "ann", 120)
    assert loaded.pending_events == ()
    assert [r.event async for r in store.read_stream("account-acc-1")] == [
        AccountOpened(owner="ann"),
        Deposited(amount=100),
        Withdrew(amount=30),
        Deposited(amount=50),
    ]


async def test_save_clears_pending_and_an_empty_save_is_a_no_op(store: EventStore) -> None:
    repo = Repository(store, Account)
    account = Account.open("acc-1", "ann")
    result = await repo.save(account)
    assert result is not None and result.version == 1
    assert account.pending_events == ()
    assert await repo.save(account) is None
    assert await store.stream_version("account-acc-1") == 1


async def test_category_is_overridable(store: EventStore) -> None:
    repo = Repository(store, Account, category="ledger")
    await repo.save(Account.open("x", "ann"))
    assert repo.stream_id("x") == "ledger-x"
    assert await store.stream_version("ledger-x") == 1
    assert (await repo.get("x")).owner == "ann"


async def test_get_of_an_empty_stream_is_not_found(store: EventStore) -> None:
    repo = Repository(store, Account)
    with pytest.raises(AggregateNotFound, match="acc-404") as caught:
        await repo.get("acc-404")
    assert caught.value.stream_id == "account-acc-404"
    assert not await repo.exists("acc-404")


async def test_concurrent_save_raises_wrong_expected_version(store: EventStore) -> None:
    repo = Repository(store, Account)
    await seed_story(repo)
    first, second = await repo.get("acc-1"), await repo.get("acc-1")
    first.withdraw(10)
    second.withdraw(20)
    await repo.save(first)
    with pytest.raises(WrongExpectedVersion) as caught:
        await repo.save(second)
    assert (caught.value.expected, caught.value.actual) == (4, 5)
    assert (await repo.get("acc-1")).balance == 110


async def test_update_retries_on_conflict(store: EventStore) -> None:
    repo = Repository(store, Account)
    await seed_story(repo)
    calls = 0

    async def change(account: Account) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # someone else writes between this load and its save
            other = await repo.get("acc-1")
            other.deposit(1)
            await repo.save(other)
        account.withdraw(5)

    updated = await repo.update("acc-1", change, retries=3)
    assert calls == 2
    assert updated.balance == 116 and (await repo.get("acc-1")).balance == 116


async def test_update_gives_up_after_retries(store: EventStore) -> None:
    repo = Repository(store, Account)
    await seed_story(repo)

    async def always_conflict(account: Account) -> None:
        other = await repo.get("acc-1")
        other.deposit(1)
        await repo.save(other)
        account.withdraw(1)

    with pytest.raises(WrongExpectedVersion):
        await repo.update("acc-1", always_conflict, retries=2)
    assert (await repo.get("acc-1")).balance == 123  # three conflicting deposits, no withdrawal


async def test_update_lets_domain_errors_through(store: EventStore) -> None:
    repo = Repository(store, Account)
    await seed_story(repo)
    with pytest.raises(InsufficientFunds):
        await repo.update("acc-1", lambda a: a.withdraw(1000), retries=3)
    assert await store.stream_version("account-acc-1") == 4


async def test_many_concurrent_updates_all_land(store: EventStore) -> None:
    repo = Repository(store, Account)
    await repo.save(Account.open("acc-1", "ann"))
    await asyncio.gather(
        *(repo.update("acc-1", lambda a: a.deposit(1), retries=50) for _ in range(20))
    )
    loaded = await repo.get("acc-1")
    assert (loaded.balance, loaded.version) == (20, 21)


async def test_get_at_a_version(store: EventStore) -> None:
    repo = Repository(store, Account)
    await seed_story(repo)
    assert (await repo.get("acc-1", version=2)).balance == 100
    earlier = await repo.get("acc-1", version=3)
    assert (earlier.version, earlier.balance) == (3, 70)
    with pytest.raises(AggregateNotFound, match="version 9"):
        await repo.get("acc-1", version=9)
    with pytest.raises(ValueError):
        await repo.get("acc-1", version=0)


async def test_get_as_of_a_moment(store: EventStore) -> None:
    repo = Repository(store, Account)
    account = Account.open("acc-1", "ann")
    account.deposit(100)
    await repo.save(account)
    records = [r async for r in store.read_stream("account-acc-1")]
    await asyncio.sleep(0.01)  # the next save is recorded at a later time
    account.withdraw(30)
    await repo.save(account)
    moment = records[-1].recorded_at
    assert (await repo.get("acc-1", as_of=moment)).balance == 100
    assert (await repo.get("acc-1", as_of=datetime.now(UTC) + timedelta(seconds=1))).balance == 70
    with pytest.raises(AggregateNotFound, match="as of"):
        await repo.get("acc-1", as_of=moment - timedelta(seconds=10))


async def test_an_unhandled_stored_type_fails_the_load(store: EventStore) -> None:
    from tests.app.domain import Closed

    await store.append("account-acc-1", [AccountOpened(owner="ann"), Closed()])
    with pytest.raises(UnhandledEvent, match=r"Account.*test.bank.closed.*version 2"):
        await Repository(store, Account).get("acc-1")

    class Lenient(Account, category="account", ignore_unknown=True):
        pass

    lenient = await Repository(store, Lenient).get("acc-1")
    assert (lenient.version, lenient.owner) == (2, "ann")


# -- snapshots ------------------------------------------------------------------------------


class Counting:
    """Wraps a store's read_stream to count the events a load reads."""

    def __init__(self, store: StoreBase) -> None:
        self.store = store
        self.read = 0
        self.original = store.read_stream

    def __enter__(self) -> Counting:
        def read_stream(*args: Any, **kwargs: Any) -> Any:
            async def counted() -> Any:
                async for record in self.original(*args, **kwargs):
                    self.read += 1
                    yield record

            return counted()

        self.store.read_stream = read_stream  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.store.read_stream


async def append_deposits(repo: Repository[Account], count: int, per_save: int = 25) -> Account:
    account = Account.open("acc-1", "ann")
    await repo.save(account)
    for start in range(0, count, per_save):
        for _ in range(min(per_save, count - start)):
            account.deposit(1)
        await repo.save(account)
    return account


async def test_snapshots_bound_what_a_load_reads(store: StoreBase) -> None:
    repo = Repository(store, Account, snapshot_every=100)
    await append_deposits(repo, 1000)  # version 1001
    snapshot = await store.read_snapshot("account-acc-1")
    assert snapshot is not None and snapshot.version == 1001 and snapshot.type == "Account"
    with Counting(store) as counting:
        loaded = await repo.get("acc-1")
    assert (loaded.version, loaded.balance, len(loaded.history)) == (1001, 1000, 1000)
    assert counting.read == 0


async def test_a_load_reads_only_events_after_the_snapshot(store: StoreBase) -> None:
    repo = Repository(store, Account, snapshot_every=100)
    account = await append_deposits(repo, 120, per_save=120)  # one save: snapshot at 121
    account.deposit(5)
    await repo.save(account)  # 122, below the next multiple: no new snapshot
    with Counting(store) as counting:
        loaded = await repo.get("acc-1")
    assert (loaded.version, loaded.balance) == (122, 125)
    assert counting.read == 1


async def test_time_travel_uses_a_snapshot_at_or_below_the_version(store: StoreBase) -> None:
    repo = Repository(store, Account, snapshot_every=10)
    await append_deposits(repo, 40, per_save=5)  # snapshots at 11, 21, 31, 41
    with Counting(store) as counting:
        at_25 = await repo.get("acc-1", version=25)
    assert (at_25.version, at_25.balance) == (25, 24)
    assert counting.read == 4  # 22..25 after the snapshot at 21
    assert (await repo.get("acc-1", version=5)).balance == 4  # before any snapshot


async def test_a_snapshot_of_another_layout_is_ignored(store: StoreBase) -> None:
    repo = Repository(store, Account, snapshot_every=50)
    await append_deposits(repo, 60, per_save=60)
    await store.save_snapshot("account-acc-1", 61, "Account", 1, '{"balance": -999}')

    class AccountV2(Account, category="account", snapshot_version=2):
        pass

    AccountV2.__qualname__ = "Account"  # the same class, its layout changed
    new_repo = Repository(store, AccountV2, snapshot_every=50)
    loaded = await new_repo.get("acc-1")
    assert loaded.balance == 60  # replayed from the events, not the stale snapshot
    fresh = await store.read_snapshot("account-acc-1")
    assert fresh is not None and fresh.schema_version == 2  # the load wrote a current one
    # and the old layout, meeting the new snapshot, replays the events too
    assert (await Repository(store, Account, snapshot_every=50).get("acc-1")).balance == 60


async def test_snapshot_every_must_be_positive(store: EventStore) -> None:
    with pytest.raises(ValueError):
        Repository(store, Account, snapshot_every=0)
