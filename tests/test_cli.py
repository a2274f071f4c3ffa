"""The `tidings` command: streams, events, tail and demo, in-process and as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from typer.testing import CliRunner, Result

import tidings
from tidings import NO_STREAM, Event, JSONCodec, TypeRegistry
from tidings.cli.main import app
from tidings.demo.ledger import LEDGER, balance_at, open_account, run_ledger


class ItemAdded(Event, type="clitest.item.added"):
    """Registered in the default registry, so the in-process CLI decodes it as itself."""

    name: str
    qty: int = 1


ELSEWHERE = TypeRegistry()


class ParcelShipped(Event, type="clitest.parcel.shipped", registry=ELSEWHERE):
    """Registered where the CLI never looks: it must still show, as an `UnknownEvent`."""

    carrier: str


JSON_KEYS = {
    "id",
    "stream_id",
    "version",
    "position",
    "type",
    "schema_version",
    "recorded_at",
    "data",
    "metadata",
}


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


async def append(url: str, stream_id: str, events: list[Event], **kwargs: Any) -> None:
    async with tidings.open_store(url) as store:
        await store.append(stream_id, events, **kwargs)


@pytest.fixture
def cli_store(tmp_path: Path) -> str:
    """A SQLite store with two streams: cart-1 (2 events) then parcel-1 (1 unknown type)."""
    url = sqlite_url(tmp_path / "cli.db")
    asyncio.run(
        append(
            url,
            "cart-1",
            [ItemAdded(name="apple", qty=2)],
            expected_version=NO_STREAM,
            metadata={"correlation_id": "req-1", "tenant": "acme"},
        )
    )
    asyncio.run(append(url, "cart-1", [ItemAdded(name="[bold]pear[/bold]")], expected_version=1))
    asyncio.run(append(url, "parcel-1", [ParcelShipped(carrier="dhl")]))
    return url


@pytest.fixture
def runner() -> CliRunner:
    # Wide, so tables never fold a value; no TIDINGS_STORE leaking in from the shell.
    return CliRunner(env={"COLUMNS": "250", "TIDINGS_STORE": None})


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def assert_one_line_error(result: Result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in result.output


# -- streams ---------------------------------------------------------------------------------


def test_streams_lists_every_stream_with_its_version(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(app, ["streams", "--store", cli_store])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "-1" in line]
    assert len(rows) == 2
    assert "cart-1" in rows[0] and rows[0].rstrip(" │").endswith("2")
    assert "parcel-1" in rows[1] and rows[1].rstrip(" │").endswith("1")


def test_streams_json(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(app, ["streams", "--json", "--store", cli_store])
    assert result.exit_code == 0, result.output
    assert json_lines(result.stdout) == [
        {"stream_id": "cart-1", "version": 2},
        {"stream_id": "parcel-1", "version": 1},
    ]


# -- events ----------------------------------------------------------------------------------


def test_events_table_shows_data_and_metadata_as_written(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(app, ["events", "cart-1", "--store", cli_store])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for header in ("version", "position", "type", "schema", "recorded_at", "data", "metadata"):
        assert header in out
    assert out.count("clitest.item.added") == 2
    assert '{"name":"apple","qty":2}' in out
    assert '{"name":"[bold]pear[/bold]","qty":1}' in out  # not swallowed as rich markup
    assert '"correlation_id":"req-1"' in out and '"tenant":"acme"' in out


def test_events_json_lines(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(app, ["events", "cart-1", "--json", "--store", cli_store])
    assert result.exit_code == 0, result.output
    first, second = json_lines(result.stdout)
    assert set(first) == JSON_KEYS
    UUID(first["id"])
    assert datetime.fromisoformat(first["recorded_at"]).tzinfo is not None
    assert first["stream_id"] == "cart-1"
    assert (first["version"], first["position"]) == (1, 1)
    assert (first["type"], first["schema_version"]) == ("clitest.item.added", 1)
    assert first["data"] == {"name": "apple", "qty": 2}
    assert first["metadata"] == {"correlation_id": "req-1", "headers": {"tenant": "acme"}}
    assert (second["version"], second["position"], second["metadata"]) == (2, 2, {})


def test_events_of_types_this_process_does_not_know(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(app, ["events", "parcel-1", "--json", "--store", cli_store])
    assert result.exit_code == 0, result.output
    [line] = json_lines(result.stdout)
    assert line["type"] == "clitest.parcel.shipped"
    assert line["data"] == {"carrier": "dhl"}
    table = runner.invoke(app, ["events", "parcel-1", "--store", cli_store])
    assert table.exit_code == 0
    assert '{"carrier":"dhl"}' in table.stdout


def test_unknown_stream_is_one_line_and_exit_2(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(app, ["events", "no-such-stream", "--store", cli_store])
    assert_one_line_error(result, "no-such-stream")


# -- tail ------------------------------------------------------------------------------------


def test_tail_prints_the_global_log(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(app, ["tail", "--store", cli_store])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3"]
    assert "cart-1@1" in lines[0] and "clitest.parcel.shipped" in lines[2]


def test_tail_after_and_limit_json(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(app, ["tail", "--after", "1", "--json", "--store", cli_store])
    assert result.exit_code == 0, result.output
    assert [line["position"] for line in json_lines(result.stdout)] == [2, 3]
    limited = runner.invoke(app, ["tail", "--limit", "1", "--json", "--store", cli_store])
    assert [line["position"] for line in json_lines(limited.stdout)] == [1]
    assert set(json_lines(limited.stdout)[0]) == JSON_KEYS


def test_tail_follow_stops_at_its_limit(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(
        app, ["tail", "--follow", "--after", "1", "--limit", "2", "--json", "--store", cli_store]
    )
    assert result.exit_code == 0, result.output
    assert [line["position"] for line in json_lines(result.stdout)] == [2, 3]


def test_tail_rejects_a_negative_position(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(app, ["tail", "--after", "-1", "--store", cli_store])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# -- finding the store -----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["streams"], ["events", "x"], ["tail"]])
def test_missing_file_is_an_error_and_is_not_created(
    runner: CliRunner, tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "absent.db"
    result = runner.invoke(app, [*command, "--store", sqlite_url(path)])
    assert_one_line_error(result, f"no event store at {path}")
    assert list(tmp_path.iterdir()) == []


def test_default_store_is_tidings_db_in_the_current_folder(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["streams"])
    assert_one_line_error(result, "no event store at ./tidings.db")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url",
    ["nosuch://x", "sqlite://host/x.db", "sqlite:///", "tidings.db", "sqlite:///x.db?bogus=1"],
)
def test_bad_url_is_one_line_and_exit_2(runner: CliRunner, url: str) -> None:
    assert_one_line_error(runner.invoke(app, ["streams", "--store", url]))


def test_tidings_store_environment_variable(runner: CliRunner, cli_store: str) -> None:
    result = runner.invoke(app, ["streams", "--json"], env={"TIDINGS_STORE": cli_store})
    assert result.exit_code == 0, result.output
    assert [line["stream_id"] for line in json_lines(result.stdout)] == ["cart-1", "parcel-1"]
    wins = runner.invoke(app, ["streams", "--store", "nosuch://"], env={"TIDINGS_STORE": cli_store})
    assert wins.exit_code == 2  # --store beats the environment


def test_usage_errors_keep_typers_exit_code(runner: CliRunner) -> None:
    result = runner.invoke(app, ["events"])
    assert result.exit_code == 2
    assert "Missing argument" in result.output


# -- demo ------------------------------------------------------------------------------------


def test_demo_shows_the_ledger(runner: CliRunner) -> None:
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "Current state: balance = 120" in result.stdout
    assert "balance as of version 2 = 100" in result.stdout
    assert "refused" in result.stdout


def test_demo_store_can_be_read_back(runner: CliRunner, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "d.db")
    result = runner.invoke(app, ["demo", "--store", url])
    assert result.exit_code == 0, result.output
    assert "balance = 120" in result.stdout
    [stream] = json_lines(runner.invoke(app, ["streams", "--json", "--store", url]).stdout)
    assert stream["stream_id"].startswith("account-")
    assert f"tidings events {stream['stream_id']} --store {url}" in result.stdout
    shown = runner.invoke(app, ["events", stream["stream_id"], "--json", "--store", url])
    assert shown.exit_code == 0, shown.output
    assert [(e["type"], e["data"]) for e in json_lines(shown.stdout)] == [
        ("account.created", {"balance": 0}),
        ("account.deposited", {"amount": 100}),
        ("account.withdrew", {"amount": 30}),
        ("account.deposited", {"amount": 50}),
    ]


def test_demo_reports_a_bad_store_url(runner: CliRunner) -> None:
    assert_one_line_error(runner.invoke(app, ["demo", "--store", "nosuch://x"]))


async def test_ledger_folds_to_120_and_travels_in_time() -> None:
    async with tidings.open_store("memory://", codec=JSONCodec(LEDGER)) as store:
        assert await run_ledger(store) == 120
        stream_id = await open_account(store)
        assert await balance_at(store, stream_id, 2) == 100
        assert await balance_at(store, stream_id) == 120


# -- real processes --------------------------------------------------------------------------


def tidings_command() -> list[str]:
    script = Path(sys.executable).with_name("tidings")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tidings.cli.main"]


def child_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "TIDINGS_STORE"}


@pytest.mark.slow
def test_demo_runs_as_a_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [*tidings_command(), "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=child_env(),
    )
    assert done.returncode == 0, done.stderr
    assert "Current state: balance = 120" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the temporary store is gone


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "lines"])
def test_tail_follow_sees_new_events_until_ctrl_c(cli_store: str, as_json: bool) -> None:
    command = [sys.executable, "-m", "tidings.cli.main", "tail", "--follow", "--after", "2"]
    command += ["--store", cli_store] + (["--json"] if as_json else [])
    lines: queue.Queue[str] = queue.Queue()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        reader = threading.Thread(target=lambda: [lines.put(line) for line in child.stdout or []])
        reader.start()
        try:
            assert "clitest.parcel.shipped" in lines.get(timeout=30)  # position 3, already there
            asyncio.run(append(cli_store, "cart-9", [ItemAdded(name="late arrival")]))
            line = lines.get(timeout=30)
            assert "late arrival" in line
            if as_json:
                assert json.loads(line)["position"] == 4
            else:
                assert line.split()[0] == "4" and "cart-9@1" in line
            child.send_signal(signal.SIGINT)
            assert child.wait(timeout=30) == 0
            assert "Traceback" not in child.stderr.read()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
            reader.join(timeout=30)


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"tidings {tidings.__version__}"
