"""Aggregates on their own: record, apply, unknown types, state and snapshots."""

from __future__ import annotations

import pytest

from tests.app.domain import Account, AccountOpened, Closed, Deposited, InsufficientFunds, Withdrew
from tidings import Aggregate, Event, NotAnEvent, UnhandledEvent, on
from tidings.core.errors import EventDefinitionError


def test_record_applies_at_once_and_queues() -> None:
    account = Account.open("acc-1", "ann")
    account.deposit(100)
    assert (account.id, account.version, account.owner, account.balance) == ("acc-1", 2, "ann", 100)
    assert account.pending_events == (AccountOpened(owner="ann"), Deposited(amount=100))


def test_a_refused_command_records_nothing() -> None:
    account = Account.open("acc-1", "ann")
    with pytest.raises(InsufficientFunds):
        account.withdraw(5)
    assert account.version == 1 and len(account.pending_events) == 1


def test_a_new_aggregate_has_id_and_version_zero() -> None:
    account = Account("acc-9")
    assert (account.id, account.version, account.balance, account.pending_events) == (
        "acc-9",
        0,
        0,
        (),
    )


def test_mutable_defaults_are_not_shared() -> None:
    first, second = Account("a"), Account("b")
    first.record(Deposited(amount=5))
    assert first.history == [5] and second.history == [] and Account.history == []


def test_recording_a_type_without_handler_names_aggregate_and_type() -> None:
    account = Account("acc-1")
    with pytest.raises(UnhandledEvent, match=r"Account.*test.bank.closed"):
        account.record(Closed())
    assert account.version == 0 and account.pending_events == ()


def test_recording_a_non_event_is_refused() -> None:
    with pytest.raises(NotAnEvent):
        Account("a").record({"amount": 5})  # type: ignore[arg-type]


def test_ignore_unknown_skips_types_without_handler() -> None:
    class Lenient(Account, ignore_unknown=True):
        pass

    lenient = Lenient("x")
    lenient.record(Closed())
    assert lenient.version == 1


def test_category_defaults_to_snake_case_and_can_be_set() -> None:
    class OrderLine(Aggregate):
        pass

    class Renamed(Aggregate, category="acct"):
        pass

    assert Account.__category__ == "account"
    assert OrderLine.__category__ == "order_line"
    assert Renamed.__category__ == "acct"


def test_handler_for_a_base_class_handles_subclasses() -> None:
    class Money(Event):
        amount: int

    class Tip(Money, type="test.aggregate.tip"):
        pass

    class Jar(Aggregate):
        total: int = 0

        @on(Money)
        def _money(self, event: Money) -> None:
            self.total += event.amount

    jar = Jar("j")
    jar.record(Tip(amount=3))
    assert jar.total == 3


def test_two_handlers_for_one_type_is_a_definition_error() -> None:
    with pytest.raises(EventDefinitionError, match="twice"):

        class Twice(Aggregate):
            @on(Deposited)
            def _a(self, event: Deposited) -> None: ...

            @on(Deposited)
            def _b(self, event: Deposited) -> None: ...


def test_snapshot_state_round_trips_through_json() -> None:
    account = Account.open("acc-1", "ann")
    account.deposit(10)
    account.record(Withdrew(amount=3))
    copy = Account("acc-1")
    copy._load_snapshot(account._dump_snapshot())
    assert (copy.owner, copy.balance, copy.history) == ("ann", 7, [10, -3])


def test_default_factories_give_each_instance_its_own_value() -> None:
    import dataclasses

    from pydantic import Field

    class Basket(Aggregate):
        items: list[str] = dataclasses.field(default_factory=list)
        tags: dict[str, int] = Field(default_factory=dict)
        note: str = Field(default="none")

        @on(Deposited)
        def _d(self, event: Deposited) -> None:
            self.items.append(str(event.amount))
            self.tags["n"] = len(self.items)

    first, second = Basket("a"), Basket("b")
    first.record(Deposited(amount=1))
    assert (first.items, first.tags, second.items, second.tags) == (["1"], {"n": 1}, [], {})
    assert second.note == "none"
    copy = Basket("a")
    copy._load_snapshot(first._dump_snapshot())
    assert (copy.items, copy.tags, copy.note) == (["1"], {"n": 1}, "none")
