"""given / when / then: it passes on the right events and fails, readably, on wrong ones."""

from __future__ import annotations

import pytest

from tests.app.domain import (
    Account,
    AccountOpened,
    Deposited,
    InsufficientFunds,
    Withdraw,
    Withdrew,
    withdraw,
)
from tidings import given


def test_aggregate_scenario_in_sync_code() -> None:
    given(AccountOpened(owner="ann"), Deposited(amount=100), aggregate=Account).when(
        lambda account: account.withdraw(30)
    ).then(Withdrew(amount=30))


def test_aggregate_scenario_raises() -> None:
    given(AccountOpened(owner="ann"), aggregate=Account).when(
        lambda account: account.withdraw(30)
    ).raises(InsufficientFunds, match="balance is 0")


def test_wrong_events_fail_with_both_lists() -> None:
    with pytest.raises(AssertionError, match=r"expected: \[Withdrew\({'amount': 31}\)\]"):
        given([AccountOpened(owner="ann"), Deposited(amount=100)], aggregate=Account).when(
            lambda account: account.withdraw(30)
        ).then(Withdrew(amount=31))


def test_an_unexpected_error_fails_then() -> None:
    with pytest.raises(AssertionError, match="InsufficientFunds"):
        given(AccountOpened(owner="ann"), aggregate=Account).when(
            lambda account: account.withdraw(30)
        ).then(Withdrew(amount=30))


def test_raises_fails_when_nothing_is_raised() -> None:
    with pytest.raises(AssertionError, match="got nothing"):
        given(AccountOpened(owner="ann"), Deposited(amount=50), aggregate=Account).when(
            lambda account: account.withdraw(30)
        ).raises(InsufficientFunds)


async def test_command_scenario_on_the_memory_store() -> None:
    await (
        given({"account-acc-1": [AccountOpened(owner="ann"), Deposited(amount=100)]})
        .when(Withdraw(account_id="acc-1", amount=30), handlers=[withdraw])
        .then(Withdrew(amount=30))
    )
    await (
        given(AccountOpened(owner="ann"), stream="account-acc-1")
        .when(Withdraw(account_id="acc-1", amount=30), handlers=[withdraw])
        .raises(InsufficientFunds)
    )


async def test_command_scenario_failing() -> None:
    scenario = (
        given(AccountOpened(owner="ann"), Deposited(amount=10), aggregate=Account, id="acc-1")
        .when(Withdraw(account_id="acc-1", amount=5), handlers=[withdraw])
        .then()
    )
    with pytest.raises(AssertionError, match=r"got:\s+\[Withdrew"):
        await scenario


def test_command_scenario_in_sync_code() -> None:
    given(AccountOpened(owner="ann"), Deposited(amount=10), aggregate=Account, id="acc-1").when(
        Withdraw(account_id="acc-1", amount=5), handlers=[withdraw]
    ).then(Withdrew(amount=5))


async def test_without_handlers_the_declared_handler_is_used() -> None:
    await (
        given({"account-acc-1": [AccountOpened(owner="ann"), Deposited(amount=100)]})
        .when(Withdraw(account_id="acc-1", amount=30))
        .then(Withdrew(amount=30))
    )
