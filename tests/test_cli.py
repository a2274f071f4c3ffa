"""The `tidings` command: streams, events, tail and projections, in-process and as real
processes (`tidings demo` has tests/test_demo.py)."""

from __future__ import annotations

import asyncio
import importlib
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
from uuid import UUID, uuid4

import pytest
from typer.testing import CliRunner, Result

import tidings
from tidings import (
    NO_STREAM,
    Event,
    JSONCodec,
    Projection,
    ProjectionRunner,
    ReadModel,
    TypeRegistry,
    on,
)
from tidings.cli.main import app
from tidings.store import StoreBase


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
    "tags",
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
    assert first["tags"] == []
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


# -- events --tag ----------------------------------------------------------------------------


class Enrolled(Event, type="clitest.enrolled", tags=("course:{course}", "student:{student}")):
    """A tagged event (a DCB one), registered in the default registry."""

    course: str
    student: str


@pytest.fixture
def tagged_store(tmp_path: Path) -> str:
    """student-7: c1, then c2; student-8: c1; note-1: untagged; parcel-1: unknown, tagged."""
    url = sqlite_url(tmp_path / "tags.db")
    asyncio.run(append(url, "student-7", [Enrolled(course="c1", student="7")]))
    asyncio.run(append(url, "note-1", [ItemAdded(name="course:c1")]))  # the text, not a tag
    asyncio.run(append(url, "student-8", [Enrolled(course="c1", student="8")]))
    asyncio.run(append(url, "student-7", [Enrolled(course="c2", student="7")]))
    shipped = tidings.UnknownEvent(
        type="clitest.parcel.shipped", version=1, data={"carrier": "ups"}, tags=("course:c1",)
    )
    asyncio.run(append(url, "parcel-1", [shipped]))
    return url


def test_events_tag_finds_them_in_every_stream_in_position_order(
    runner: CliRunner, tagged_store: str
) -> None:
    result = runner.invoke(app, ["events", "--tag", "course:c1", "--json", "--store", tagged_store])
    assert result.exit_code == 0, result.output
    lines = json_lines(result.stdout)
    assert [(e["stream_id"], e["position"]) for e in lines] == [
        ("student-7", 1),
        ("student-8", 3),
        ("parcel-1", 5),  # a type this process does not know keeps its tags
    ]
    assert all(set(e) == JSON_KEYS for e in lines)
    assert [e["tags"] for e in lines] == [
        ["course:c1", "student:7"],
        ["course:c1", "student:8"],
        ["course:c1"],
    ]


def test_events_several_tags_means_all_of_them(runner: CliRunner, tagged_store: str) -> None:
    both = ["--tag", "course:c1", "--tag", "student:7", "--json", "--store", tagged_store]
    result = runner.invoke(app, ["events", *both])
    assert result.exit_code == 0, result.output
    assert [(e["stream_id"], e["version"]) for e in json_lines(result.stdout)] == [("student-7", 1)]
    none = runner.invoke(
        app,
        ["events", "--tag", "course:c2", "--tag", "student:8", "--json", "--store", tagged_store],
    )
    assert none.exit_code == 0, none.output
    assert none.stdout == ""


def test_events_of_one_stream_with_a_tag(runner: CliRunner, tagged_store: str) -> None:
    result = runner.invoke(
        app, ["events", "student-7", "--tag", "course:c2", "--json", "--store", tagged_store]
    )
    assert result.exit_code == 0, result.output
    [line] = json_lines(result.stdout)
    assert (line["stream_id"], line["version"], line["tags"]) == (
        "student-7",
        2,
        ["course:c2", "student:7"],
    )
    missing = runner.invoke(
        app, ["events", "nobody", "--tag", "course:c2", "--store", tagged_store]
    )
    assert_one_line_error(missing, "nobody")


def test_events_table_shows_the_tags(runner: CliRunner, tagged_store: str) -> None:
    result = runner.invoke(app, ["events", "--tag", "course:c1", "--store", tagged_store])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "events tagged course:c1" in out
    header = next(line for line in out.splitlines() if "version" in line)
    assert header.split()[:2] == ["stream", "version"]  # from every stream: which one
    assert "tags" in header.split()
    assert "student:7" in out and "student:8" in out
    assert "note-1" not in out  # its data holds the text, but it carries no tag
    assert "clitest.parcel.shipped" in out and '{"carrier":"ups"}' in out
    assert "course:c2" not in out
    one = runner.invoke(app, ["events", "student-7", "--store", tagged_store])
    assert one.exit_code == 0, one.output
    assert "stream student-7" in one.stdout
    assert "course:c1" in one.stdout and "course:c2" in one.stdout


def test_events_needs_a_stream_or_a_tag(runner: CliRunner, tagged_store: str) -> None:
    result = runner.invoke(app, ["events", "--store", tagged_store])
    assert result.exit_code == 2
    assert "STREAM" in result.output and "--tag" in result.output
    assert "Traceback" not in result.output
    empty = runner.invoke(app, ["events", "--tag", "", "--store", tagged_store])
    assert empty.exit_code == 2
    assert "Traceback" not in empty.output


def test_events_help_explains_tag_with_an_example(runner: CliRunner) -> None:
    result = runner.invoke(app, ["events", "--help"])
    assert result.exit_code == 0, result.output
    assert "--tag" in result.stdout
    assert "--tag course:c1" in result.stdout
    assert "every tag" in result.stdout


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


@pytest.mark.parametrize(
    "command", [["streams"], ["events", "x"], ["tail"], ["projections", "status"]]
)
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
    result = runner.invoke(app, ["trace"])
    assert result.exit_code == 2
    assert "Missing argument" in result.output


# -- projections -----------------------------------------------------------------------------


class ItemCounts(Projection, name="clitest_item_counts"):
    """Counts added items by name; reads the default registry's `ItemAdded`."""

    @on(ItemAdded)
    def added(self, event: ItemAdded) -> None:
        self.view.put(event.name, self.view.get(event.name, 0) + event.qty)


STATUS_KEYS = {
    "name",
    "generation",
    "position",
    "head",
    "lag_events",
    "lag_seconds",
    "updated_at",
    "rebuilding",
    "segment",
    "segments",
    "owner",
}


@pytest.fixture
def status_store(cli_store: str) -> str:
    """`cli_store` with `clitest_item_counts` caught up to position 3, then one more event
    (head 4), and a first rebuild of `clitest_other` started but not finished."""

    async def setup() -> None:
        async with tidings.open_store(cli_store) as store:
            assert await ProjectionRunner(store, [ItemCounts()]).catch_up() == 3
            await store.append("cart-2", [ItemAdded(name="plum")])
            assert isinstance(store, StoreBase)
            await store.start_rebuild("clitest_other")

    asyncio.run(setup())
    return cli_store


def test_projections_status_json(runner: CliRunner, status_store: str) -> None:
    result = runner.invoke(app, ["projections", "status", "--json", "--store", status_store])
    assert result.exit_code == 0, result.output
    counts, other = json_lines(result.stdout)
    assert set(counts) == STATUS_KEYS and set(other) == STATUS_KEYS
    assert counts["name"] == "clitest_item_counts"
    assert (counts["generation"], counts["position"], counts["head"]) == (1, 3, 4)
    assert (counts["lag_events"], counts["rebuilding"]) == (1, False)
    assert counts["lag_seconds"] >= 0
    assert datetime.fromisoformat(counts["updated_at"]).tzinfo is not None
    assert other["name"] == "clitest_other"
    assert (other["position"], other["head"], other["lag_events"]) == (0, 4, 4)
    assert other["rebuilding"] is True


def test_projections_status_table(runner: CliRunner, status_store: str) -> None:
    result = runner.invoke(app, ["projections", "status", "--store", status_store])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "head of the log: position 4" in out
    for header in (
        "projection",
        "gen",
        "position",
        "lag",
        "updated at (UTC)",
        "rebuilding",
        "owner",
    ):
        assert header in out
    [counts] = [line for line in out.splitlines() if "clitest_item_counts" in line]
    [other] = [line for line in out.splitlines() if "clitest_other" in line]
    # name, generation, position, lag in events, lag in seconds, date, time, rebuilding, owner
    cells = counts.split()
    assert cells[1:4] == ["1", "3", "1"] and cells[-2:] == ["no", "-"]
    float(cells[4])
    datetime.fromisoformat(f"{cells[5]} {cells[6]}")
    assert other.split()[2:4] == ["0", "4"] and other.split()[-2:] == ["yes", "-"]


def test_projections_status_of_a_store_without_projections(
    runner: CliRunner, cli_store: str
) -> None:
    result = runner.invoke(app, ["projections", "status", "--json", "--store", cli_store])
    assert (result.exit_code, result.stdout) == (0, "")
    table = runner.invoke(app, ["projections", "status", "--store", cli_store])
    assert table.exit_code == 0 and "head of the log: position 3" in table.stdout


SHOP_APP = """
from tidings import Event, Projection, TypeRegistry, on
from tidings.demo.ledger import AccountBalances  # imported, so not one of this app's

SHOP = TypeRegistry()  # not the default registry: rebuild must decode with this one


class ItemSold(Event, type="shop.item.sold", registry=SHOP):
    sku: str
    qty: int


class Base(Projection):  # no handlers: a base class, not a projection
    pass


class SalesBySku(Projection, name="sales_by_sku"):
    @on(ItemSold)
    def sold(self, event: ItemSold) -> None:
        self.view.put(event.sku, self.view.get(event.sku, 0) + event.qty)


class SaleCount(Projection, name="sale_count"):
    @on(ItemSold)
    def sold(self, event: ItemSold) -> None:
        self.view.put("sales", self.view.get("sales", 0) + 1)


PROJECTIONS = [SalesBySku()]
"""


@pytest.fixture
def shop_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """An application module in its own folder, on sys.path, and a store holding its events
    and a wrong, stale `sales_by_sku` read model (generation 1, at the head): `(module, url)`."""
    module = f"shop_app_{uuid4().hex[:8]}"
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / f"{module}.py").write_text(SHOP_APP)
    monkeypatch.syspath_prepend(str(folder))
    shop = importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module)
    url = sqlite_url(tmp_path / "shop.db")

    async def setup() -> None:
        async with tidings.open_store(url, codec=JSONCodec(shop.SHOP)) as store:
            for sku, qty in [("apple", 2), ("pear", 1), ("apple", 3)]:
                await store.append(f"sale-{sku}", [shop.ItemSold(sku=sku, qty=qty)])
            assert isinstance(store, StoreBase)
            await store.commit_projection("sales_by_sku", 1, 0, 3, {"apple": "99", "ghost": "1"})

    asyncio.run(setup())
    return module, url


async def documents(url: str, name: str) -> dict[str, Any]:
    async with tidings.open_store(url, codec=JSONCodec(keep_unknown=True)) as store:
        return await ReadModel(store, name).all()


def status_of(runner: CliRunner, url: str) -> dict[str, dict[str, Any]]:
    result = runner.invoke(app, ["projections", "status", "--json", "--store", url])
    assert result.exit_code == 0, result.output
    return {line["name"]: line for line in json_lines(result.stdout)}


@pytest.mark.parametrize("form", ["module", "module:PROJECTIONS"])
def test_projections_rebuild_refills_the_read_model(
    runner: CliRunner, shop_app: tuple[str, str], form: str
) -> None:
    module, url = shop_app
    assert asyncio.run(documents(url, "sales_by_sku")) == {"apple": 99, "ghost": 1}
    target = form.replace("module", module)
    result = runner.invoke(
        app, ["projections", "rebuild", "sales_by_sku", "--app", target, "--store", url]
    )
    assert result.exit_code == 0, result.output
    assert "Rebuilt sales_by_sku: generation 2 is live, at position 3" in result.stdout
    assert asyncio.run(documents(url, "sales_by_sku")) == {"apple": 5, "pear": 1}
    status = status_of(runner, url)
    assert set(status) == {"sales_by_sku"}  # only the rebuilt projection was touched
    assert status["sales_by_sku"]["generation"] == 2
    assert (status["sales_by_sku"]["position"], status["sales_by_sku"]["lag_events"]) == (3, 0)
    assert status["sales_by_sku"]["rebuilding"] is False


def test_projections_rebuild_takes_store_from_the_environment(
    runner: CliRunner, shop_app: tuple[str, str]
) -> None:
    module, url = shop_app
    result = runner.invoke(
        app, ["projections", "rebuild", "sale_count", "--app", module], env={"TIDINGS_STORE": url}
    )
    assert result.exit_code == 0, result.output
    assert asyncio.run(documents(url, "sale_count")) == {"sales": 3}


def test_projections_rebuild_unknown_name_lists_the_known_ones(
    runner: CliRunner, shop_app: tuple[str, str]
) -> None:
    module, url = shop_app
    result = runner.invoke(app, ["projections", "rebuild", "nope", "--app", module, "--store", url])
    assert_one_line_error(result, "'nope'", "known: sale_count, sales_by_sku")
    listed = runner.invoke(
        app, ["projections", "rebuild", "sale_count", "--app", f"{module}:PROJECTIONS"]
    )
    assert_one_line_error(listed, "'sale_count'", "known: sales_by_sku")
    assert status_of(runner, url)["sales_by_sku"]["generation"] == 1  # nothing was rebuilt


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_app_module", "cannot import no_such_app_module"),
        ("{module}:MISSING", "has no attribute 'MISSING'"),
        ("{module}:SHOP", "is not a Projection"),
        (":PROJECTIONS", "name a module"),
    ],
)
def test_projections_rebuild_bad_app_is_one_line(
    runner: CliRunner, shop_app: tuple[str, str], target: str, message: str
) -> None:
    module, url = shop_app
    result = runner.invoke(
        app,
        ["projections", "rebuild", "x", "--app", target.format(module=module), "--store", url],
    )
    assert_one_line_error(result, message)


def test_projections_rebuild_never_creates_a_store(
    runner: CliRunner, shop_app: tuple[str, str], tmp_path: Path
) -> None:
    module, _ = shop_app
    path = tmp_path / "absent.db"
    result = runner.invoke(
        app,
        ["projections", "rebuild", "sales_by_sku", "--app", module, "--store", sqlite_url(path)],
    )
    assert_one_line_error(result, f"no event store at {path}")
    assert not path.exists()


# -- real processes --------------------------------------------------------------------------


def tidings_command() -> list[str]:
    script = Path(sys.executable).with_name("tidings")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tidings.cli.main"]


def child_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "TIDINGS_STORE"}


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


@pytest.mark.slow
@pytest.mark.parametrize("found_by", ["current folder", "PYTHONPATH"])
def test_projections_rebuild_runs_as_a_command(
    shop_app: tuple[str, str], tmp_path: Path, found_by: str
) -> None:
    module, url = shop_app
    env = child_env()
    if found_by == "PYTHONPATH":
        env["PYTHONPATH"] = str(tmp_path / "app")
        cwd = tmp_path
    else:
        env.pop("PYTHONPATH", None)
        cwd = tmp_path / "app"
    done = subprocess.run(
        [*tidings_command(), "projections", "rebuild", "sales_by_sku", "--app", module],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**env, "TIDINGS_STORE": url},
    )
    assert done.returncode == 0, done.stderr
    assert "Rebuilt sales_by_sku: generation 2" in done.stdout
    assert asyncio.run(documents(url, "sales_by_sku")) == {"apple": 5, "pear": 1}
