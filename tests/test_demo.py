"""`tidings demo` and `tidings.demo.ledger`: the seed's account ledger as an event-sourced
aggregate, time travel, a refused stale writer and a read model."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tidings
from tests.test_cli import (
    assert_one_line_error,
    child_env,
    json_lines,
    sqlite_url,
    tidings_command,
)
from tidings import JSONCodec, ReadModel, Repository, default_registry
from tidings.cli.main import app
from tidings.demo.ledger import (
    LEDGER,
    Account,
    AccountBalances,
    InsufficientFunds,
    run_ledger,
)

READ_MODEL = re.compile(
    r"Read model \(CQRS\): after runner\.wait_for\((\d+)\), "
    r"ledger_balances\['(account-[0-9a-f]{8})'\] = (\{.*\})"
)


@pytest.fixture
def runner() -> CliRunner:
    # Wide, so no line of the narrative is wrapped; no TIDINGS_STORE leaking in.
    return CliRunner(env={"COLUMNS": "250", "TIDINGS_STORE": None})


def test_demo_tells_the_story(runner: CliRunner) -> None:
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "through Repository(Account)" in out
    assert re.search(r"repo\.get\('[0-9a-f]{8}', version=2\) -> balance as of version 2 = 100", out)
    assert "Current state: balance = 120" in out
    assert (
        "a second writer loaded the account at version 2 (balance 100) and tried to withdraw "
        "all of it; its save was refused (the stream is at version 4); nothing was written"
    ) in out
    found = READ_MODEL.search(out)
    assert found is not None, out
    assert found.group(1) == "4"  # the position of the last save: read-your-writes
    assert found.group(3) == '{"balance": 120, "version": 4}'
    # the replay table: each version's balance, loaded from the store
    balances = [line.split("│")[-2].strip() for line in out.splitlines() if "account." in line]
    assert balances == ["0", "100", "70", "120"]


def test_demo_store_keeps_events_and_read_model(runner: CliRunner, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "d.db")
    result = runner.invoke(app, ["demo", "--store", url])
    assert result.exit_code == 0, result.output
    [stream] = json_lines(runner.invoke(app, ["streams", "--json", "--store", url]).stdout)
    stream_id = stream["stream_id"]
    assert stream_id.startswith("account-") and stream["version"] == 4  # the refusal wrote nothing
    assert f"tidings events {stream_id} --store {url}" in result.stdout
    assert f"tidings projections status --store {url}" in result.stdout
    shown = runner.invoke(app, ["events", stream_id, "--json", "--store", url])
    assert shown.exit_code == 0, shown.output
    assert [(e["type"], e["data"]) for e in json_lines(shown.stdout)] == [
        ("account.created", {"balance": 0}),
        ("account.deposited", {"amount": 100}),
        ("account.withdrew", {"amount": 30}),
        ("account.deposited", {"amount": 50}),
    ]
    status = runner.invoke(app, ["projections", "status", "--json", "--store", url])
    assert status.exit_code == 0, status.output
    [line] = json_lines(status.stdout)
    assert (line["name"], line["position"], line["head"], line["lag_events"]) == (
        "ledger_balances",
        4,
        4,
        0,
    )


def test_demo_read_model_can_be_rebuilt(runner: CliRunner, tmp_path: Path) -> None:
    """The demo's projection reads events of the `LEDGER` registry: the rebuild must too."""
    url = sqlite_url(tmp_path / "d.db")
    assert runner.invoke(app, ["demo", "--store", url]).exit_code == 0
    assert runner.invoke(app, ["demo", "--store", url]).exit_code == 0  # a second account
    result = runner.invoke(
        app,
        ["projections", "rebuild", "ledger_balances", "--app", "tidings.demo.ledger"],
        env={"TIDINGS_STORE": url},
    )
    assert result.exit_code == 0, result.output
    assert "Rebuilt ledger_balances: generation 2 is live, at position 8" in result.stdout

    async def read() -> dict[str, object]:
        async with tidings.open_store(url, codec=JSONCodec(LEDGER)) as store:
            return await ReadModel(store, AccountBalances).all()

    documents = asyncio.run(read())
    assert len(documents) == 2
    assert all(doc == {"balance": 120, "version": 4} for doc in documents.values())


def test_demo_on_a_memory_store_says_it_is_gone(runner: CliRunner) -> None:
    result = runner.invoke(app, ["demo", "--store", "memory://"])
    assert result.exit_code == 0, result.output
    assert "Current state: balance = 120" in result.stdout
    assert "its events are gone now" in result.stdout


def test_demo_reports_a_bad_store_url(runner: CliRunner) -> None:
    assert_one_line_error(runner.invoke(app, ["demo", "--store", "nosuch://x"]))


# -- the ledger as a library -----------------------------------------------------------------


async def test_run_ledger_travels_in_time_and_reads_its_writes() -> None:
    async with tidings.open_store("memory://", codec=JSONCodec(LEDGER)) as store:
        run = await run_ledger(store, "acc-1")
        assert (run.stream_id, run.balance_at_2, run.balance) == ("account-acc-1", 100, 120)
        assert [step.balance for step in run.steps] == [0, 100, 70, 120]
        assert [step.record.type for step in run.steps] == [
            "account.created",
            "account.deposited",
            "account.withdrew",
            "account.deposited",
        ]
        assert run.refusal is not None
        assert (run.refusal.expected, run.refusal.actual) == (2, 4)
        assert run.position == 4
        assert run.read_model == {"balance": 120, "version": 4}

        repo = Repository(store, Account)
        assert (await repo.get("acc-1", version=2)).balance == 100
        assert (await repo.get("acc-1")).version == 4

        second = await run_ledger(store)
        assert second.position == 8 and second.read_model == {"balance": 120, "version": 4}
        balances = await ReadModel(store, AccountBalances).all()
        assert set(balances) == {"account-acc-1", second.stream_id}


def test_account_refuses_to_overdraw() -> None:
    account = Account.open("acc-2")
    account.deposit(10)
    with pytest.raises(InsufficientFunds):
        account.withdraw(11)
    assert account.balance == 10
    assert [type(event).__name__ for event in account.pending_events] == [
        "AccountCreated",
        "Deposited",
    ]


def test_ledger_events_stay_out_of_the_default_registry() -> None:
    for name in ("account.created", "account.deposited", "account.withdrew"):
        assert (name, 1) in LEDGER
        assert (name, 1) not in default_registry


@pytest.mark.slow
def test_demo_runs_as_a_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [*tidings_command(), "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**child_env(), "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    assert "Current state: balance = 120" in done.stdout
    assert "balance as of version 2 = 100" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the temporary store is gone


def test_demo_shows_both_notification_styles(runner: CliRunner) -> None:
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "its outbox relay published 3 of them to the 'orders' topic" in out
    assert "Event notification: the email service got order.placed with only the order id" in out
    assert "email to grace@example.com: order o-1002 (monitor), 219.00 EUR" in out
    assert (
        "keeps its own copy (3 orders, behind an inbox); revenue by customer from that copy: "
        "ada 135.00 EUR, grace 219.00 EUR"
    ) in out


async def test_the_email_service_reads_only_the_id_and_analytics_the_whole_order(
    tmp_path: Path,
) -> None:
    from tidings.demo.orders import NOTIFICATIONS, ORDERS, OrderPlacedNotice, run_orders

    assert set(OrderPlacedNotice.model_fields) == {"order_id"}  # the notification contract
    assert NOTIFICATIONS.find("order.placed", 1) is OrderPlacedNotice
    async with (
        tidings.open_store(f"sqlite:///{tmp_path / 'orders.db'}", codec=JSONCodec(ORDERS)) as store,
        tidings.open_broker("memory://") as broker,
    ):
        run = await run_orders(store, broker, tmp_path)
        dead = await broker.dead_letters()
    assert run.relayed == 3 and run.copies == 3 and len(run.emails) == 3
    assert run.lookups >= 3  # one call back per notification, more if the read model lagged
    assert run.analytics == {"ada": 13500, "grace": 21900}
    assert dead == []  # the lookups that found nothing yet were retried, not given up
