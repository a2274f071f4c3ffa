"""The test domain: the issue's `Account` aggregate, its commands and handlers."""

from __future__ import annotations

from tidings import (
    Aggregate,
    Command,
    CommandContext,
    Event,
    handles,
    on,
)


class AccountOpened(Event, type="test.bank.opened"):
    owner: str


class Deposited(Event, type="test.bank.deposited"):
    amount: int


class Withdrew(Event, type="test.bank.withdrew"):
    amount: int


class Closed(Event, type="test.bank.closed"):
    pass


class InsufficientFunds(Exception):
    def __init__(self, account_id: str, amount: int, balance: int) -> None:
        self.account_id, self.amount, self.balance = account_id, amount, balance
        super().__init__(f"{account_id}: cannot withdraw {amount}, balance is {balance}")


class Account(Aggregate):
    owner: str = ""
    balance: int = 0
    history: list[int] = []  # noqa: RUF012  (copied per instance by Aggregate)

    @classmethod
    def open(cls, account_id: str, owner: str) -> Account:
        account = cls(account_id)
        account.record(AccountOpened(owner=owner))
        return account

    def deposit(self, amount: int) -> None:
        self.record(Deposited(amount=amount))

    def withdraw(self, amount: int) -> None:
        if amount > self.balance:
            raise InsufficientFunds(self.id, amount, self.balance)
        self.record(Withdrew(amount=amount))

    @on(AccountOpened)
    def _opened(self, event: AccountOpened) -> None:
        self.owner = event.owner

    @on(Deposited)
    def _deposited(self, event: Deposited) -> None:
        self.balance += event.amount
        self.history.append(event.amount)

    @on(Withdrew)
    def _withdrew(self, event: Withdrew) -> None:
        self.balance -= event.amount
        self.history.append(-event.amount)


class OpenAccount(Command):
    account_id: str
    owner: str


class Deposit(Command):
    account_id: str
    amount: int


class Withdraw(Command):
    account_id: str
    amount: int


@handles(OpenAccount)
async def open_account(command: OpenAccount, ctx: CommandContext) -> str:
    await ctx.repository(Account).save(Account.open(command.account_id, command.owner))
    return command.account_id


@handles(Deposit)
async def deposit(command: Deposit, ctx: CommandContext) -> int:
    account = await ctx.repository(Account).update(
        command.account_id, lambda a: a.deposit(command.amount)
    )
    return account.balance


@handles(Withdraw)
async def withdraw(command: Withdraw, ctx: CommandContext) -> int:
    account = await ctx.repository(Account).update(
        command.account_id, lambda a: a.withdraw(command.amount)
    )
    return account.balance
