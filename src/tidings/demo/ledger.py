"""The account ledger from the seed article: an account's state is the fold of its events.

`run_ledger` writes the seed's story to a new account stream (opened, deposited 100, withdrew
30, deposited 50) and replays it from the store: the balance is 120. The ledger's events live
in their own `LEDGER` registry, so they never clash with an application's `account.*` types;
a store must be opened with `codec=JSONCodec(LEDGER)` to read them as typed events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from tidings.core.errors import WrongExpectedVersion
from tidings.core.events import Event, TypeRegistry
from tidings.core.recorded import RecordedEvent
from tidings.store import NO_STREAM, EventStore

__all__ = [
    "LEDGER",
    "AccountCreated",
    "Deposited",
    "LedgerStep",
    "Withdrew",
    "apply",
    "balance_at",
    "new_account_id",
    "open_account",
    "replay",
    "run_ledger",
    "stale_withdrawal",
    "story",
]

LEDGER = TypeRegistry()
"""The demo's own type registry: its `account.*` names never reach `default_registry`."""


class AccountCreated(Event, type="account.created", registry=LEDGER):
    """An account was opened with a starting balance."""

    balance: int = 0


class Deposited(Event, type="account.deposited", registry=LEDGER):
    """Money was paid into the account."""

    amount: int


class Withdrew(Event, type="account.withdrew", registry=LEDGER):
    """Money was taken out of the account."""

    amount: int


@dataclass(frozen=True, slots=True)
class LedgerStep:
    """One replayed event and the balance right after it, for showing a replay step by step."""

    record: RecordedEvent[Any]
    balance: int


def story() -> list[Event]:
    """The seed article's four events, as new instances (each call gives new event ids)."""
    return [
        AccountCreated(balance=0),
        Deposited(amount=100),
        Withdrew(amount=30),
        Deposited(amount=50),
    ]


def new_account_id() -> str:
    """A fresh stream id such as `account-1f2e3d4c`, so every run writes its own stream."""
    return f"account-{uuid4().hex[:8]}"


def apply(balance: int, event: Event) -> int:
    """The balance after `event`: the ledger's whole state transition, in one place.

    An event the ledger does not know is a `TypeError`, not a silent zero: it usually means the
    store was opened without `codec=JSONCodec(LEDGER)`.
    """
    match event:
        case AccountCreated():
            return event.balance
        case Deposited():
            return balance + event.amount
        case Withdrew():
            return balance - event.amount
    raise TypeError(
        f"the ledger cannot apply {type(event).__name__} events; "
        "open the store with codec=JSONCodec(LEDGER)"
    )


async def open_account(store: EventStore, stream_id: str | None = None) -> str:
    """Write the story to a new account stream, one append per event; returns the stream id.

    Each append names the version this writer last saw (`NO_STREAM`, then 1, 2, 3): that is
    optimistic concurrency, so a concurrent writer would be refused instead of interleaved.
    """
    stream_id = stream_id or new_account_id()
    expected = NO_STREAM
    for event in story():
        result = await store.append(stream_id, [event], expected_version=expected)
        expected = result.version
    return stream_id


async def stale_withdrawal(
    store: EventStore, stream_id: str, seen_version: int
) -> WrongExpectedVersion | None:
    """Withdraw 500 as a writer whose view of the stream stopped at `seen_version`.

    Returns the `WrongExpectedVersion` the store answers when the stream has moved on since
    (nothing is written); None means the stream was still at that version and the withdrawal
    was stored.
    """
    try:
        await store.append(stream_id, [Withdrew(amount=500)], expected_version=seen_version)
    except WrongExpectedVersion as refusal:
        return refusal
    return None


async def replay(
    store: EventStore, stream_id: str, *, up_to: int | None = None
) -> list[LedgerStep]:
    """Fold the stream's events, read back from the store, keeping the balance after each.

    The store is the only source of truth: nothing but the events is read. `up_to` stops at
    that version, which is time travel: the account as it was then.
    """
    steps: list[LedgerStep] = []
    balance = 0
    async for record in store.read_stream(stream_id, limit=up_to):
        balance = apply(balance, record.event)
        steps.append(LedgerStep(record, balance))
    return steps


async def balance_at(store: EventStore, stream_id: str, version: int | None = None) -> int:
    """The balance as of `version` (the latest when None); 0 for an account with no events."""
    steps = await replay(store, stream_id, up_to=version)
    return steps[-1].balance if steps else 0


async def run_ledger(store: EventStore) -> int:
    """Write the story to a new account and return its balance replayed from `store` (120)."""
    stream_id = await open_account(store)
    return await balance_at(store, stream_id)
