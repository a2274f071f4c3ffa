"""`tidings demo`: the tour of the seed's patterns, in one process and with its services as
worker processes over Redis, RabbitMQ and NATS; and `tidings.demo.ledger` as a library."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

import tidings
from tests.backends import broker_url, require
from tests.test_cli import (
    assert_one_line_error,
    child_env,
    json_lines,
    sqlite_url,
    tidings_command,
)
from tidings import JSONCodec, ReadModel, Repository, default_registry
from tidings.app.trace import TraceStep
from tidings.cli.main import app
from tidings.demo.ledger import (
    LEDGER,
    Account,
    AccountBalances,
    InsufficientFunds,
    run_ledger,
)
from tidings.demo.tour import run_tour

READ_MODEL = re.compile(
    r"Read model \(CQRS\): after runner\.wait_for\((\d+)\), "
    r"ledger_balances\['(account-[0-9a-f]{8})'\] = (\{.*\})"
)


@pytest.fixture
def runner() -> CliRunner:
    # Wide, so no line of the narrative is wrapped; no TIDINGS_STORE leaking in.
    return CliRunner(env={"COLUMNS": "250", "TIDINGS_STORE": None})


CHAPTERS = [
    "1. Event sourcing: the account ledger",
    "2. Schema evolution: an order from the previous release",
    "3. Commands: the order service takes orders",
    "4. Outbox: stored first, then published",
    "5. Event notification: the email service",
    "6. Event-carried state transfer: the analytics service",
    "7. A process manager: payment, shipping, refund",
    "8. CQRS: one write model, read models shaped for each question",
    "9. Temporal decoupling: the analytics service goes away",
    "10. Debugging: the causation tree of one order",
]


def test_demo_tells_the_story(runner: CliRunner) -> None:
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    positions = [out.find(title) for title in CHAPTERS]
    assert -1 not in positions and positions == sorted(positions), out
    # 1: the ledger
    assert "through Repository(Account)" in out
    assert re.search(r"repo\.get\('[0-9a-f]{8}', version=2\) -> balance as of version 2 = 100", out)
    assert "Current state: balance = 120" in out
    assert (
        "a second writer loaded the account at version 2 (balance 100) and tried to withdraw "
        "all of it; its save was refused (the stream is at version 4); nothing was written"
    ) in out
    assert "loading it now reads the snapshot at version 3 and 1 event after it" in out
    found = READ_MODEL.search(out)
    assert found is not None, out
    assert found.group(1) == "4"  # the position of the last save: read-your-writes
    assert found.group(3) == '{"balance": 120, "version": 4}'
    balances = [line.split("│")[-2].strip() for line in out.splitlines() if "account." in line]
    assert balances == ["0", "100", "70", "120"]
    # 2: the v1 order read as v2
    assert '"total": "42.50"' in out and "total_cents = 4250" in out
    # 3-6: commands, the relay, both notification styles
    assert len(re.findall(r"PlaceOrder o-[0-9a-f]{4}-\d \(", out)) == 5
    assert "published 4 order.placed events to 'orders'" in out
    assert re.search(r"email to grace@example\.com: order o-[0-9a-f]{4}-0 \(cable\), 42\.50", out)
    assert "Revenue by customer, from that copy: ada 1134.00 EUR, grace 261.50 EUR" in out
    # 7: the saga, with its compensation
    assert re.search(r"o-[0-9a-f]{4}-2 \(monitor\): shipped", out)
    assert re.search(r"o-[0-9a-f]{4}-3 \(mouse, unicorn\): refunded 1033\.00 EUR, cancelled", out)
    # 8: the second read model
    assert "orders_by_customer['ada']: 2 orders, spent 101.00 EUR" in out
    # 9: analytics stopped, then caught up
    assert "analytics has missed 2 orders" in out
    assert re.search(r"it caught up on the 2 orders in [\d.]+ s \(6 copied\)", out)
    # 10: the causation tree, from the command to the compensation
    tree = out[out.index(CHAPTERS[-1]) :]
    for step in (
        "command PlaceOrder",
        "order.placed",
        "command TakePayment",
        "order.payment_taken",
        "command ShipOrder",
        "order.shipping_failed",
        "command RefundPayment",
        "order.payment_refunded",
        "command CancelOrder",
        "order.cancelled",
        "fulfilment.started",
    ):
        assert step in tree, step


async def test_the_tour_links_each_step_to_its_cause(tmp_path: Path) -> None:
    tour = await run_tour(sqlite_url(tmp_path / "d.db"), tmp_path, Console(file=io.StringIO()))
    [root] = tour.trace  # one tree: every command hangs under the event that sent it
    assert (root.kind, root.type) == ("command", "PlaceOrder")

    def walk(step: TraceStep, depth: int) -> list[tuple[int, str, str | None]]:
        found = [(depth, step.kind, step.type)]
        for child in step.children:
            found += walk(child, depth + 1)
        return found

    chain = [(kind, type_) for _, kind, type_ in walk(root, 0) if kind == "command"]
    assert chain == [
        ("command", "PlaceOrder"),
        ("command", "TakePayment"),
        ("command", "ShipOrder"),
        ("command", "RefundPayment"),
        ("command", "CancelOrder"),
    ]
    assert tour.statuses == {
        tour.orders[0]: "shipped",
        tour.orders[1]: "shipped",
        tour.orders[2]: "cancelled",
    }
    assert tour.legacy_total_cents == 4250
    assert (
        tour.relayed >= 4
        and len(tour.emails) == 6
        and sorted(set(tour.copied)) == sorted(tour.copied)
    )
    assert len(tour.copied) == 6 and tour.missed_while_stopped == 2
    assert tour.by_customer["ada"]["spent_cents"] == 10100  # the refund deducted
    assert tour.processes == {}  # in-process, on the memory broker


@pytest.mark.parametrize("backend", ["redis", "rabbitmq", "nats", "kafka"])
async def test_the_services_run_as_processes_over_a_broker(backend: str, tmp_path: Path) -> None:
    """`tidings demo --broker URL`: email and analytics as worker processes of their own."""
    require(backend)
    out = io.StringIO()
    tour = await run_tour(
        sqlite_url(tmp_path / "d.db"),
        tmp_path,
        Console(file=out, width=200),
        broker_url=broker_url(backend),
    )
    text = out.getvalue()
    assert set(tour.processes) == {"email", "analytics"}
    pids = [*tour.processes["email"], *tour.processes["analytics"]]
    assert len(set(pids)) == 3 and os.getpid() not in pids  # analytics: stopped, started again
    # the analytics worker was stopped and started again: a new process caught up
    assert len(tour.copied) == 6 and len(set(tour.copied)) == 6 and tour.missed_while_stopped == 2
    assert len(tour.emails) == 6
    assert f"(worker process {tour.processes['analytics'][0]}, over " in text
    assert "guest:guest" not in text  # the broker's password is not printed
    assert sorted(tour.statuses.values()) == ["cancelled", "shipped", "shipped"]
    for pid in pids:  # every worker is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_demo_refuses_to_share_a_memory_store_with_processes(runner: CliRunner) -> None:
    result = runner.invoke(app, ["demo", "--store", "memory://", "--broker", broker_url("redis")])
    assert_one_line_error(result, "cannot share memory://")


def test_demo_store_keeps_events_and_read_model(runner: CliRunner, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "d.db")
    result = runner.invoke(app, ["demo", "--store", url])
    assert result.exit_code == 0, result.output
    streams = json_lines(runner.invoke(app, ["streams", "--json", "--store", url]).stdout)
    [account] = [s for s in streams if s["stream_id"].startswith("account-")]
    assert account["version"] == 4  # the refusal wrote nothing
    assert len([s for s in streams if s["stream_id"].startswith("order-")]) == 6
    assert len([s for s in streams if s["stream_id"].startswith("fulfilment-")]) == 6
    for line in ("tidings streams", "tidings trace checkout-o-", "tidings projections status"):
        assert f"{line}" in result.stdout
    shown = runner.invoke(app, ["events", account["stream_id"], "--json", "--store", url])
    assert shown.exit_code == 0, shown.output
    assert [(e["type"], e["data"]) for e in json_lines(shown.stdout)] == [
        ("account.created", {"balance": 0}),
        ("account.deposited", {"amount": 100}),
        ("account.withdrew", {"amount": 30}),
        ("account.deposited", {"amount": 50}),
    ]
    status = runner.invoke(app, ["projections", "status", "--json", "--store", url])
    assert status.exit_code == 0, status.output
    lag = {line["name"]: line["lag_events"] for line in json_lines(status.stdout)}
    assert lag == dict.fromkeys(
        [
            "fulfilment",
            "ledger_balances",
            "order_details",
            "orders_by_customer",
            "outbox:demo-orders",
        ],
        0,
    )
    traced = re.search(r"tidings trace (checkout-o-[0-9a-f]{4}-3) --store", result.stdout)
    assert traced is not None
    tree = runner.invoke(app, ["trace", traced.group(1), "--json", "--store", url])
    assert tree.exit_code == 0, tree.output
    [root] = json.loads(tree.stdout)["steps"]
    assert (root["kind"], root["type"]) == ("command", "PlaceOrder")


def test_demo_read_model_can_be_rebuilt(runner: CliRunner, tmp_path: Path) -> None:
    """The demo's projection reads events of the `LEDGER` registry: the rebuild must too."""
    url = sqlite_url(tmp_path / "d.db")
    assert runner.invoke(app, ["demo", "--store", url]).exit_code == 0
    assert runner.invoke(app, ["demo", "--store", url]).exit_code == 0  # a second run
    result = runner.invoke(
        app,
        ["projections", "rebuild", "ledger_balances", "--app", "tidings.demo.ledger"],
        env={"TIDINGS_STORE": url},
    )
    assert result.exit_code == 0, result.output
    assert "Rebuilt ledger_balances: generation 2 is live, at position" in result.stdout

    async def read() -> dict[str, object]:
        async with tidings.open_store(url, codec=JSONCodec(LEDGER), create=False) as store:
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


@pytest.mark.slow
def test_demo_leaves_the_console_running_on_its_store(tmp_path: Path) -> None:
    """`tidings demo --console`: the story, then the console on the demo's store."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = subprocess.Popen(
        [*tidings_command(), "demo", "--console", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**child_env(), "COLUMNS": "200"},
    )
    try:
        assert child.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        for line in child.stdout:
            lines.append(line)
            if line.startswith("tidings console: http://") or time.monotonic() > deadline:
                break
        assert lines[-1].strip() == f"tidings console: http://127.0.0.1:{port}/", "".join(lines)
        traced = re.search(r"correlation (checkout-o-[0-9a-f]{4}-3)", "".join(lines))
        assert traced is not None
        for _attempt in range(100):  # uvicorn binds right after printing the address
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/s/0/streams?q=order-", timeout=5)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert page.status_code == 200
        assert traced.group(1).removeprefix("checkout-") in page.text  # the demo's orders
        trace = httpx.get(f"http://127.0.0.1:{port}/s/0/trace/{traced.group(1)}", timeout=5)
        assert trace.status_code == 200 and "order.payment_refunded" in trace.text
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
    assert child.returncode == 0
    assert list(tmp_path.iterdir()) == []  # the temporary store is gone once it stops
