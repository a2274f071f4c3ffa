"""The schema file and its compatibility check: each incompatible change of issue 7 is caught
with its one-line message, compatible ones pass, in every mode; and the CLI's exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from uuid import uuid4

import pytest
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from tidings import ConfigurationError, Event, TypeRegistry
from tidings.cli.main import app
from tidings.core.upcasting import upcaster
from tidings.schema import (
    FORMAT_VERSION,
    Mode,
    Problem,
    check,
    load_schema_file,
    schema_document,
    write_schema_file,
)


class Address(BaseModel):
    street: str
    zip: str


class Address2(BaseModel):  # the same shape under another name, zip now an int
    street: str
    zip: int


class Address3(BaseModel):
    street: str
    zip: str
    city: str


class Line(BaseModel):
    sku: str
    qty: int


class Line2(BaseModel):
    sku: str
    qty: float


class Postal(BaseModel):
    street: str
    zip: str


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sku: str


BASE = """
order_id: str
total: int
placed_at: datetime
address: Address
lines: list[Line]
status: Literal["new", "paid"] = "new"
note: str | None = None
"""


def code(placed: str = BASE, *, shipped: str = "order_id: str", more: str = "") -> TypeRegistry:
    """A registry (never the default one) with `order.placed` v1 of fields `placed`,
    `order.shipped` v1 of fields `shipped`, and `more` code run after them."""
    registry = TypeRegistry()
    namespace: dict[str, Any] = {
        "Event": Event,
        "registry": registry,
        "upcaster": upcaster,
        "Any": Any,
        "Literal": Literal,
        "datetime": datetime,
        "ConfigDict": ConfigDict,
        **{cls.__name__: cls for cls in (Address, Address2, Address3, Postal, Line, Line2, Strict)},
    }

    def body(fields: str) -> str:
        return "".join(f"    {line}\n" for line in fields.strip().splitlines())

    run(
        "class OrderPlaced(Event, type='order.placed', registry=registry):\n"
        + body(placed)
        + "class OrderShipped(Event, type='order.shipped', registry=registry):\n"
        + body(shipped)
        + more,
        namespace,
    )
    return registry


def run(source: str, namespace: dict[str, Any]) -> None:
    """Run class definitions; annotations evaluated now (not this module's postponed ones)."""
    exec(compile(source, "<events>", "exec", dont_inherit=True), namespace)


FILE = schema_document(code())


def problems(registry: TypeRegistry, mode: Mode = "backward") -> list[str]:
    return [str(p) for p in check(registry, FILE, mode)]


# -- the file --------------------------------------------------------------------------------


def test_the_file_holds_every_type_and_version_sorted(tmp_path: Path) -> None:
    registry = code(
        more="class V10(Event, type='order.shipped', version=10, registry=registry):\n"
        "    order_id: str\n"
        "class V2(Event, type='order.shipped', version=2, registry=registry):\n"
        "    order_id: str\n",
    )
    path = tmp_path / "events.schema.json"
    written = write_schema_file(registry, path)
    assert load_schema_file(path) == written
    assert written["format_version"] == FORMAT_VERSION
    assert list(written["events"]) == ["order.placed", "order.shipped"]
    assert list(written["events"]["order.shipped"]) == ["1", "2", "10"]  # by number
    placed = written["events"]["order.placed"]["1"]
    assert placed["required"] == ["order_id", "total", "placed_at", "address", "lines"]
    assert "Address" in placed["$defs"]
    first = path.read_text()
    write_schema_file(registry, path)
    assert path.read_text() == first  # stable: a re-export changes nothing


def test_a_missing_or_foreign_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="run `tidings schema export`"):
        load_schema_file(tmp_path / "nope.json")
    (tmp_path / "other.json").write_text('{"format_version": 99, "events": {}}')
    with pytest.raises(ConfigurationError, match="format_version 99"):
        load_schema_file(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ConfigurationError, match="not a tidings schema file"):
        load_schema_file(tmp_path / "bad.json")
    with pytest.raises(ConfigurationError, match="mode 'sideways'"):
        check(code(), FILE, "sideways")  # type: ignore[arg-type]


# -- fields ----------------------------------------------------------------------------------

P = "order.placed v1: "
REMOVED = P + "field 'total' was removed or renamed without a version bump"
NEW_REQUIRED = (
    P + "new required field '{}' has no default: stored events lack it (give it a default, "
    "or bump the version with an upcaster)"
)
NARROWED = (
    P + "field '{}' changed type from {} to {}: the new type does not accept every stored value"
)
WIDENED = (
    P + "field '{}' changed type from {} to {}: consumers built on the file do not accept "
    "every value the new type allows"
)

CASES: list[tuple[str, str, list[str], list[str], list[str]]] = [
    # name, new fields of order.placed, backward, forward, full
    ("removed field", BASE.replace("total: int\n", ""), [REMOVED], [REMOVED], [REMOVED]),
    (
        "renamed field",
        BASE.replace("total: int", "amount: int"),
        [REMOVED, NEW_REQUIRED.format("amount")],
        [REMOVED],
        [REMOVED, NEW_REQUIRED.format("amount")],
    ),
    (
        "new required field",
        BASE + "currency: str",
        [NEW_REQUIRED.format("currency")],
        [],  # old consumers ignore a field they do not know
        [NEW_REQUIRED.format("currency")],
    ),
    (
        "changed type",
        BASE.replace("total: int", "total: str"),
        [NARROWED.format("total", "integer", "string")],
        [WIDENED.format("total", "integer", "string")],
        [NARROWED.format("total", "integer", "string")],  # once, though both directions fail
    ),
    (
        "changed type in a nested model",
        BASE.replace("address: Address", "address: Address2"),
        [NARROWED.format("address.zip", "string", "integer")],
        [WIDENED.format("address.zip", "string", "integer")],
        [NARROWED.format("address.zip", "string", "integer")],
    ),
    (
        "field removed in list items' model",
        BASE.replace("lines: list[Line]", "lines: list[Strict]"),
        [P + "field 'lines[].qty' was removed or renamed without a version bump"],
        [P + "field 'lines[].qty' was removed or renamed without a version bump"],
        [P + "field 'lines[].qty' was removed or renamed without a version bump"],
    ),
    (
        "new required field in a nested model",
        BASE.replace("address: Address", "address: Address3"),
        [NEW_REQUIRED.format("address.city")],
        [],
        [NEW_REQUIRED.format("address.city")],
    ),
    (
        "int widened to float in list items",
        BASE.replace("lines: list[Line]", "lines: list[Line2]"),
        [],  # a number field reads stored integers
        [WIDENED.format("lines[].qty", "integer", "number")],
        [WIDENED.format("lines[].qty", "integer", "number")],
    ),
    (
        "Optional dropped",
        BASE.replace("note: str | None = None", "note: str = ''"),
        [NARROWED.format("note", "string | null", "string")],
        [],
        [NARROWED.format("note", "string | null", "string")],
    ),
    (
        "Optional added",
        BASE.replace("total: int", "total: int | None"),
        [],
        [WIDENED.format("total", "integer", "integer | null")],
        [WIDENED.format("total", "integer", "integer | null")],
    ),
    (
        "new enum value",
        BASE.replace('Literal["new", "paid"]', 'Literal["new", "paid", "refunded"]'),
        [],
        [WIDENED.format("status", '"new" | "paid"', '"new" | "paid" | "refunded"')],
        [WIDENED.format("status", '"new" | "paid"', '"new" | "paid" | "refunded"')],
    ),
    (
        "enum value removed",
        BASE.replace('Literal["new", "paid"]', 'Literal["new"]'),
        [NARROWED.format("status", '"new" | "paid"', '"new"')],
        [],
        [NARROWED.format("status", '"new" | "paid"', '"new"')],
    ),
    (
        "string format dropped",
        BASE.replace("placed_at: datetime", "placed_at: str"),
        [],
        [WIDENED.format("placed_at", "string (date-time)", "string")],
        [WIDENED.format("placed_at", "string (date-time)", "string")],
    ),
    (
        "optional field made required",
        BASE.replace("note: str | None = None", "note: str | None"),
        [P + "field 'note' became required: events written without it could no longer be read"],
        [],  # writers always write every field
        [P + "field 'note' became required: events written without it could no longer be read"],
    ),
    # compatible in every mode
    ("nothing changed", BASE, [], [], []),
    ("added optional field", BASE + "currency: str = 'EUR'", [], [], []),
    ("added Optional field", BASE + "coupon: str | None = None", [], [], []),
    ("nested model renamed, same shape", BASE.replace("Address", "Postal"), [], [], []),
    ("field made optional", BASE.replace("total: int", "total: int = 0"), [], [], []),
]


@pytest.mark.parametrize(
    ("placed", "backward", "forward", "full"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_field_change_is_judged_in_each_mode(
    placed: str, backward: list[str], forward: list[str], full: list[str]
) -> None:
    registry = code(placed)
    assert problems(registry, "backward") == backward
    assert problems(registry, "forward") == forward
    assert problems(registry, "full") == full


def test_problems_say_where_and_what() -> None:
    (problem,) = check(code(BASE.replace("total: int\n", "")), FILE)
    assert problem == Problem(
        "order.placed", 1, "total", REMOVED.split(": ", 1)[1], "backward", "removed"
    )


def test_a_new_field_is_refused_forward_when_consumers_forbid_unknown_fields() -> None:
    forbid = "model_config = ConfigDict(extra='forbid')\norder_id: str"
    baseline = schema_document(code(shipped=forbid))
    registry = code(shipped=forbid + "\ncarrier: str = 'post'")
    assert [str(p) for p in check(registry, baseline, "forward")] == [
        "order.shipped v1: new field 'carrier': consumers built on the file forbid unknown "
        "fields (extra='forbid')"
    ]
    assert check(registry, baseline, "backward") == []


# -- types and versions ----------------------------------------------------------------------

SHIPPED_V2 = (
    "class ShippedV2(Event, type='order.shipped', version=2, registry=registry):\n"
    "    order_id: str\n"
    "    carrier: str\n"
)
UPCAST_1_TO_2 = (
    "@upcaster('order.shipped', from_version=1, registry=registry)\n"
    "def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:\n"
    "    return {**data, 'carrier': 'post'}\n"
)
NEW_VERSION = (
    "order.shipped v2: is a new version; consumers that know only v1 cannot read it "
    "(forward compatibility allows no version bump: upgrade them first)"
)


def without_shipped_v1(registry: TypeRegistry) -> TypeRegistry:
    """`registry` (classes and upcasters) without the class of `order.shipped` v1."""
    out = TypeRegistry()
    for cls in registry:
        if (cls.__event_type__, cls.__event_version__) != ("order.shipped", 1):
            out.register(cls)
    for step in registry.upcasters():
        out.add_upcaster(step)
    return out


def only_v2(more: str = "") -> TypeRegistry:
    """`order.shipped` bumped to v2: the v1 class is gone."""
    return without_shipped_v1(code(more=more))


def test_a_version_bump_needs_an_upcaster_from_the_previous_version() -> None:
    registry = only_v2(SHIPPED_V2)
    assert problems(registry) == [
        "order.shipped v1: bumped to v2 without an upcaster from v1: stored v1 events could "
        "no longer be read"
    ]
    assert problems(only_v2(SHIPPED_V2 + UPCAST_1_TO_2)) == []


def test_a_bump_keeping_the_old_class_still_needs_the_upcaster() -> None:
    registry = code(more=SHIPPED_V2)  # v1 and v2 both registered, no upcaster
    assert problems(registry) == [
        "order.shipped v1: bumped to v2 without an upcaster from v1: stored v1 events would "
        "still be read as v1, not as v2"
    ]
    assert problems(code(more=SHIPPED_V2 + UPCAST_1_TO_2)) == []


def test_forward_refuses_any_version_bump_and_full_both() -> None:
    with_upcaster = only_v2(SHIPPED_V2 + UPCAST_1_TO_2)
    assert problems(with_upcaster, "forward") == [NEW_VERSION]
    assert problems(with_upcaster, "full") == [NEW_VERSION]
    assert problems(only_v2(SHIPPED_V2), "full") == [
        "order.shipped v1: bumped to v2 without an upcaster from v1: stored v1 events could "
        "no longer be read",
        NEW_VERSION,
    ]


def test_a_removed_type_cannot_read_its_stored_events() -> None:
    registry = without_shipped_v1(code())
    assert problems(registry) == [
        "order.shipped v1: the event type or version was removed or renamed: stored events of "
        "it could no longer be read (keep the class, or add an upcaster, with to_type= for a "
        "rename)"
    ]
    assert problems(registry, "forward") == []  # consumers just stop getting it


RENAMED = (
    "class Dispatched(Event, type='order.dispatched', version=2, registry=registry):\n"
    "    order_id: str\n"
)
RENAMING_UPCASTER = (
    "@upcaster('order.shipped', 1, to_type='order.dispatched', to_version=2, registry=registry)\n"
    "def renamed(data: dict[str, Any]) -> dict[str, Any]:\n"
    "    return data\n"
)


def test_a_rename_needs_an_upcaster_with_to_type() -> None:
    assert problems(without_shipped_v1(code(more=RENAMED)))[0].startswith(
        "order.shipped v1: the event type or version was removed or renamed"
    )
    renamed = without_shipped_v1(code(more=RENAMED + RENAMING_UPCASTER))
    assert problems(renamed) == []
    assert problems(renamed, "full") == []  # a new type is no forward problem either


def test_a_new_event_type_is_compatible_in_every_mode() -> None:
    registry = code(
        more="class Cancelled(Event, type='order.cancelled', registry=registry):\n"
        "    order_id: str\n    reason: str\n"
    )
    for mode in ("backward", "forward", "full"):
        assert problems(registry, mode) == []  # type: ignore[arg-type]


# -- the command -----------------------------------------------------------------------------

EVENTS_V1 = """
from tidings import Event, TypeRegistry

EVENTS = TypeRegistry()

class OrderPlaced(Event, type="order.placed", registry=EVENTS):
    order_id: str
    total: int
"""


def user_module(folder: Path, source: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh module in `folder` (on sys.path) holding `source`; its name."""
    name = f"schema_app_{uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    return name


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_export_then_check_in_process(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    v1 = user_module(tmp_path, EVENTS_V1, monkeypatch)
    result = runner.invoke(app, ["schema", "export", "--app", f"{v1}:EVENTS"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "wrote events.schema.json: 1 event type, 1 schema\n"
    assert "order.placed" in load_schema_file(tmp_path / "events.schema.json")["events"]

    result = runner.invoke(app, ["schema", "check", "--app", f"{v1}:EVENTS"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: 1 event type compatible with events.schema.json (backward)\n"

    optional = user_module(tmp_path, EVENTS_V1 + "    note: str = ''\n", monkeypatch)
    result = runner.invoke(app, ["schema", "check", "--app", f"{optional}:EVENTS"])
    assert result.exit_code == 0, result.output
    assert "events.schema.json is out of date" in result.stderr

    broken = EVENTS_V1.replace("total: int", "amount: int")
    v2 = user_module(tmp_path, broken, monkeypatch)
    result = runner.invoke(app, ["schema", "check", "--app", f"{v2}:EVENTS", "--mode", "full"])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "order.placed v1: field 'total' was removed or renamed without a version bump",
        "order.placed v1: new required field 'amount' has no default: stored events lack it "
        "(give it a default, or bump the version with an upcaster)",
    ]
    assert result.stderr == "2 incompatible changes against events.schema.json (full)\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "no_such_module_here"], "cannot import no_such_module_here"),
        (["--file", "missing.json"], "missing.json does not exist"),
        (["--app", "{v1}:NOPE"], "has no attribute 'NOPE'"),
        (["--app", "{v1}:OrderPlaced"], "is not a TypeRegistry"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    runner: CliRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    v1 = user_module(tmp_path, EVENTS_V1, monkeypatch)
    runner.invoke(app, ["schema", "export", "--app", f"{v1}:EVENTS"])
    args = [a.format(v1=v1) for a in args]
    if "--app" not in args:
        args += ["--app", f"{v1}:EVENTS"]
    result = runner.invoke(app, ["schema", "check", *args])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr


def test_bad_mode_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(app, ["schema", "check", "--app", "x", "--mode", "sideways"])
    assert result.exit_code == 2


def test_default_registry_and_several_modules_merge(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = user_module(tmp_path, EVENTS_V1, monkeypatch)
    second = user_module(
        tmp_path,
        EVENTS_V1.replace("order.placed", "order.paid").replace("OrderPlaced", "OrderPaid"),
        monkeypatch,
    )
    result = runner.invoke(
        app,
        ["schema", "export", "--app", f"{first}:EVENTS", "--app", f"{second}:EVENTS", "-o", "-"],
    )
    assert result.exit_code == 0, result.output
    assert '"order.paid"' in result.stdout and '"order.placed"' in result.stdout


@pytest.mark.slow
def test_check_runs_as_a_command_for_ci(tmp_path: Path) -> None:
    (tmp_path / "shop_events.py").write_text(EVENTS_V1)
    command = [sys.executable, "-m", "tidings.cli.main", "schema"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )

    assert run("export", "--app", "shop_events:EVENTS").returncode == 0
    assert run("check", "--app", "shop_events:EVENTS").returncode == 0
    (tmp_path / "shop_events.py").write_text(EVENTS_V1.replace("total: int", "total: str"))
    done = run("check", "--app", "shop_events:EVENTS")
    assert done.returncode == 1, done.stderr
    assert done.stdout == (
        "order.placed v1: field 'total' changed type from integer to string: the new type "
        "does not accept every stored value\n"
    )


@pytest.mark.slow
def test_a_module_alone_means_the_default_registry(tmp_path: Path) -> None:
    source = EVENTS_V1.replace(", registry=EVENTS", "")  # classes join the default registry
    (tmp_path / "plain_events.py").write_text(source)
    command = [sys.executable, "-m", "tidings.cli.main", "schema", "export"]
    done = subprocess.run(
        [*command, "--app", "plain_events", "--output", "-"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert list(json.loads(done.stdout)["events"]) == ["order.placed"]
