"""Commands: routing, correlation and causation on every event caused, errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.app.domain import (
    Account,
    Deposit,
    InsufficientFunds,
    OpenAccount,
    Withdraw,
    deposit,
    open_account,
    withdraw,
)
from tidings import (
    Command,
    CommandBus,
    CommandContext,
    ConfigurationError,
    EventStore,
    InvalidCommand,
    NoCommandHandler,
    TidingsError,
    correlate,
    current_correlation,
    handles,
)


@pytest.fixture
def bus(store: EventStore) -> CommandBus:
    return CommandBus(store, open_account, deposit, withdraw)


async def test_dispatch_returns_what_the_handler_returns(bus: CommandBus) -> None:
    assert await bus.dispatch(OpenAccount(account_id="acc-1", owner="ann")) == "acc-1"
    assert await bus.dispatch(Deposit(account_id="acc-1", amount=100)) == 100
    assert await bus.dispatch(Withdraw(account_id="acc-1", amount=30)) == 70
    assert (await bus.repository(Account).get("acc-1")).balance == 70


async def test_events_carry_the_correlation_and_the_command_as_cause(
    bus: CommandBus, store: EventStore
) -> None:
    command = OpenAccount(account_id="acc-1", owner="ann")
    await bus.dispatch(command)
    deposit_command = Deposit(account_id="acc-1", amount=5)
    await bus.dispatch(deposit_command, correlation_id="request-42")
    opened, deposited = [r async for r in store.read_stream("account-acc-1")]
    assert opened.causation_id == str(command.command_id)
    assert opened.correlation_id is not None and opened.correlation_id != "request-42"
    assert deposited.correlation_id == "request-42"
    assert deposited.causation_id == str(deposit_command.command_id)


async def test_a_command_continues_the_correlation_in_effect(
    bus: CommandBus, store: EventStore
) -> None:
    with correlate("incoming-7"):
        await bus.dispatch(OpenAccount(account_id="acc-1", owner="ann"))
        assert current_correlation() is not None
    assert current_correlation() is None
    [opened] = [r async for r in store.read_stream("account-acc-1")]
    assert opened.correlation_id == "incoming-7"


async def test_a_domain_error_reaches_the_caller_unchanged(
    bus: CommandBus, store: EventStore
) -> None:
    await bus.dispatch(OpenAccount(account_id="acc-1", owner="ann"))
    with pytest.raises(InsufficientFunds) as caught:
        await bus.dispatch(Withdraw(account_id="acc-1", amount=5))
    assert (caught.value.amount, caught.value.balance) == (5, 0)
    assert await store.stream_version("account-acc-1") == 1


async def test_invalid_command_names_the_field_and_stores_nothing(
    bus: CommandBus, store: EventStore
) -> None:
    with pytest.raises(InvalidCommand) as caught:
        Deposit(account_id="acc-1", amount="lots")  # type: ignore[arg-type]
    error = caught.value
    assert isinstance(error, ValidationError) and isinstance(error, TidingsError)
    assert [e["loc"] for e in error.errors()] == [("amount",)]
    assert "amount" in str(error) and "Deposit" in str(error)
    with pytest.raises(InvalidCommand, match="owner"):
        OpenAccount.parse({"account_id": "acc-1"})
    with pytest.raises(InvalidCommand, match="surprise"):
        OpenAccount.parse('{"account_id": "a", "owner": "b", "surprise": 1}')
    assert await store.last_position() == 0


async def test_parse_builds_a_command_from_data() -> None:
    command = Deposit.parse({"account_id": "acc-1", "amount": "12"})
    assert command == Deposit(account_id="acc-1", amount=12)
    assert command.command_id != Deposit(account_id="acc-1", amount=12).command_id


async def test_a_command_nobody_handles(bus: CommandBus) -> None:
    class Unrouted(Command):
        pass

    with pytest.raises(NoCommandHandler, match="Unrouted"):
        await bus.dispatch(Unrouted())


async def test_handlers_as_methods_of_an_object_and_sync(store: EventStore) -> None:
    class Handlers:
        def __init__(self) -> None:
            self.seen: list[str] = []

        @handles(OpenAccount)
        def open(self, command: OpenAccount) -> str:
            self.seen.append(command.owner)
            return "sync"

    handlers = Handlers()
    bus = CommandBus(store, handlers)
    assert await bus.dispatch(OpenAccount(account_id="a", owner="ann")) == "sync"
    assert handlers.seen == ["ann"]


async def test_one_handler_per_command(store: EventStore) -> None:
    bus = CommandBus(store, open_account)

    @handles(OpenAccount)
    def another(command: OpenAccount) -> None: ...

    with pytest.raises(ConfigurationError, match="already has a handler"):
        bus.register(another)
    with pytest.raises(ConfigurationError, match="no @handles"):
        bus.register(object())


async def test_bus_handles_decorator_registers(store: EventStore) -> None:
    bus = CommandBus(store)

    @bus.handles(Deposit)
    async def on_deposit(command: Deposit) -> int:
        return command.amount * 2

    assert await bus.dispatch(Deposit(account_id="a", amount=4)) == 8


async def test_a_bus_without_store_runs_handlers_that_need_none() -> None:
    @handles(Deposit)
    def double(command: Deposit) -> int:
        return command.amount * 2

    bus = CommandBus(double)
    assert await bus.dispatch(Deposit(account_id="a", amount=4)) == 8

    @handles(OpenAccount)
    async def needs_store(command: OpenAccount, ctx: CommandContext) -> None:
        ctx.store  # noqa: B018

    bus.register(needs_store)
    with pytest.raises(ConfigurationError, match="no store"):
        await bus.dispatch(OpenAccount(account_id="a", owner="ann"))
