"""The account ledger from the seed article, built the way an application would build it.

The write side is an event-sourced `Account` aggregate saved through a `Repository`: it is
opened, deposited 100, withdrew 30, deposited 50, and its state is the fold of those events
(balance 120; 100 as of version 2), and
the repository snapshots it every `SNAPSHOT_EVERY` events, so loading it reads the newest
snapshot and only the events after it. The read side is the `AccountBalances` projection, kept
up to date by a `ProjectionRunner` and queried through a `ReadModel` (CQRS).

The ledger's events live in their own `LEDGER` registry, so they never clash with an
application's `account.*` types: open the store with `codec=JSONCodec(LEDGER)` to use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from tidings.app.aggregate import Aggregate
from tidings.app.handlers import on
from tidings.app.projections import Projection, ReadModel
from tidings.app.repository import Repository
from tidings.app.runner import ProjectionRunner
from tidings.core.errors import WrongExpectedVersion
from tidings.core.events import Event, TypeRegistry
from tidings.core.recorded import RecordedEvent
from tidings.store import EventStore
from tidings.store.base import StoreBase

__all__ = [
    "LEDGER",
    "Account",
    "AccountBalances",
    "AccountCreated",
    "Deposited",
    "InsufficientFunds",
    "LedgerRun",
    "LedgerStep",
    "SNAPSHOT_EVERY",
    "Withdrew",
    "history",
    "new_account_id",
    "run_ledger",
]

LEDGER = TypeRegistry()
"""The demo's own type registry: its `account.*` names never reach `default_registry`."""


# -- events: the facts ---------------------------------------------------------------------


class AccountCreated(Event, type="account.created", registry=LEDGER):
    """An account was opened with a starting balance."""

    balance: int = 0


class Deposited(Event, type="account.deposited", registry=LEDGER):
    """Money was paid into the account."""

    amount: int


class Withdrew(Event, type="account.withdrew", registry=LEDGER):
    """Money was taken out of the account."""

    amount: int


# -- the write side: an event-sourced aggregate ---------------------------------------------


class InsufficientFunds(ValueError):
    """A withdrawal larger than the balance: refused before any event is recorded."""


class Account(Aggregate, category="account"):
    """An account whose balance is the fold of its events; stream ids are `account-<id>`.

    Behaviour methods decide and `record`; the `@on` handlers only change state, so loading
    the account at any version replays exactly what happened.
    """

    balance: int = 0

    @classmethod
    def open(cls, account_id: str) -> Account:
        """A new account with balance 0 (saving it writes `account.created`)."""
        account = cls(account_id)
        account.record(AccountCreated(balance=0))
        return account

    def deposit(self, amount: int) -> None:
        """Pay `amount` in."""
        self.record(Deposited(amount=amount))

    def withdraw(self, amount: int) -> None:
        """Take `amount` out; `InsufficientFunds` when the balance is smaller."""
        if amount > self.balance:
            raise InsufficientFunds(f"cannot withdraw {amount}: the balance is {self.balance}")
        self.record(Withdrew(amount=amount))

    @on(AccountCreated)
    def _created(self, event: AccountCreated) -> None:
        self.balance = event.balance

    @on(Deposited)
    def _deposited(self, event: Deposited) -> None:
        self.balance += event.amount

    @on(Withdrew)
    def _withdrew(self, event: Withdrew) -> None:
        self.balance -= event.amount


# -- the read side: a projection into a read model ------------------------------------------


class AccountBalances(Projection, name="ledger_balances"):
    """One document per account stream: `{"balance": …, "version": …}`, ready to query."""

    @on(AccountCreated)
    def created(self, event: AccountCreated, record: RecordedEvent[Any]) -> None:
        self.view.put(record.stream_id, {"balance": event.balance, "version": record.version})

    @on(Deposited)
    def deposited(self, event: Deposited, record: RecordedEvent[Any]) -> None:
        self._add(record, event.amount)

    @on(Withdrew)
    def withdrew(self, event: Withdrew, record: RecordedEvent[Any]) -> None:
        self._add(record, -event.amount)

    def _add(self, record: RecordedEvent[Any], amount: int) -> None:
        document = self.view.get(record.stream_id, {"balance": 0})
        self.view.put(
            record.stream_id, {"balance": document["balance"] + amount, "version": record.version}
        )


# -- the story ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerStep:
    """One replayed event and the balance right after it, for showing a replay step by step."""

    record: RecordedEvent[Any]
    balance: int


@dataclass(frozen=True, slots=True)
class LedgerRun:
    """What `run_ledger` did and found, for the demo to show."""

    account_id: str
    stream_id: str
    steps: list[LedgerStep]
    """The stream read back from the store, each event with the balance after it."""
    balance_at_2: int
    """`repo.get(account_id, version=2).balance`: time travel (100)."""
    balance: int
    """`repo.get(account_id).balance`: the current state (120)."""
    refusal: WrongExpectedVersion | None
    """What the store answered the stale writer (None would mean it was not refused)."""
    position: int
    """The global position of the last event saved, which the read model was awaited at."""
    read_model: Any
    """The account's `AccountBalances` document, read right after waiting for `position`."""
    snapshot_version: int | None = None
    """The version of the account's newest snapshot (taken every `SNAPSHOT_EVERY` events):
    loading the account reads it and only the events after it."""


SNAPSHOT_EVERY = 3
"""The ledger's repository saves the account's state every 3 events."""


def new_account_id() -> str:
    """A fresh account id such as `1f2e3d4c`, so every run writes its own stream."""
    return uuid4().hex[:8]


async def history(repo: Repository[Account], account_id: str) -> list[LedgerStep]:
    """Every event of the account with the balance after it, by loading each version."""
    steps = []
    async for record in repo.store.read_stream(repo.stream_id(account_id)):
        then = await repo.get(account_id, version=record.version)
        steps.append(LedgerStep(record, then.balance))
    return steps


async def run_ledger(store: EventStore, account_id: str | None = None) -> LedgerRun:
    """Tell the seed's story on `store` (opened with `codec=JSONCodec(LEDGER)`).

    Every save appends with the version the account was loaded at (`NO_STREAM`, then 1, 2,
    3), so a writer holding an older copy is refused instead of interleaved.
    """
    account_id = account_id or new_account_id()
    repo = Repository(store, Account, snapshot_every=SNAPSHOT_EVERY)
    async with ProjectionRunner(store, [AccountBalances()]) as runner:
        account = Account.open(account_id)
        await repo.save(account)
        account.deposit(100)
        await repo.save(account)

        stale = await repo.get(account_id)  # a second writer loads the account at version 2

        account.withdraw(30)
        await repo.save(account)
        account.deposit(50)
        saved = await repo.save(account)
        assert saved is not None

        refusal = None
        stale.withdraw(stale.balance)  # all it sees (100), but the account has moved on
        try:
            await repo.save(stale)
        except WrongExpectedVersion as exc:
            refusal = exc

        await runner.wait_for(saved.position)  # read your own writes
        document = await ReadModel(store, AccountBalances).get(repo.stream_id(account_id))

    return LedgerRun(
        account_id=account_id,
        stream_id=repo.stream_id(account_id),
        steps=await history(repo, account_id),
        balance_at_2=(await repo.get(account_id, version=2)).balance,
        balance=(await repo.get(account_id)).balance,
        refusal=refusal,
        position=saved.position,
        read_model=document,
        snapshot_version=await _snapshot_version(store, repo.stream_id(account_id)),
    )


async def _snapshot_version(store: EventStore, stream_id: str) -> int | None:
    if not isinstance(store, StoreBase):
        return None
    snapshot = await store.read_snapshot(stream_id)
    return None if snapshot is None else snapshot.version
