"""`tidings schema export|check|asyncapi`: the committed event contract, guarded in CI.

`export` writes every registered event type's JSON Schema to `events.schema.json`; `check`
compares the code with that file and exits 1 with one line per incompatible change (see
`tidings.schema` for the rules); `asyncapi` writes the AsyncAPI 3.0 document of a
`tidings.asyncapi.Contract`. Usage errors (no such module, no file) exit 2.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tidings.asyncapi import Contract, document
from tidings.cli.loading import import_module, import_target
from tidings.core.errors import ConfigurationError
from tidings.core.events import TypeRegistry, default_registry
from tidings.schema import Mode, check, load_schema_file, schema_document, write_schema_file

__all__ = ["app", "asyncapi", "export", "load_contract", "load_registry", "schema_check"]

DEFAULT_FILE = "events.schema.json"

app = typer.Typer(
    name="schema",
    help="Your events' schemas: export them to a committed file, check the code against it "
    "in CI, and publish the AsyncAPI document of your services.",
    no_args_is_help=True,
)

AppsOption = Annotated[
    list[str],
    typer.Option(
        "--app",
        metavar="MODULE[:REGISTRY]",
        help="A module declaring your event classes (and upcasters), imported from the "
        "current folder or $PYTHONPATH; repeat it for several. `myapp.events` takes the "
        "default registry, which every Event class joins unless it names another; "
        "`myapp.events:REGISTRY` takes that TypeRegistry instead.",
    ),
]


def _output_option(help: str) -> Any:
    """`--output PATH` / `-o PATH`: where a command writes its document."""
    return typer.Option("--output", "-o", metavar="PATH", help=help)


FileOption = Annotated[
    Path,
    typer.Option("--file", metavar="PATH", help="The schema file `export` wrote."),
]


@app.command()
def export(
    apps: AppsOption,
    output: Annotated[
        Path,
        _output_option("Where to write it (`-` for standard output)."),
    ] = Path(DEFAULT_FILE),
) -> None:
    """Write the JSON Schema of every registered event type and version to a file to commit.

    The file is `{"format_version": 1, "events": {TYPE: {VERSION: schema}}}`, sorted, so its
    diff shows exactly what changed. Export again after a compatible change (an added
    optional field, a new event type or version) so the next `check` compares against it.
    """
    registry = load_registry(apps)
    if str(output) == "-":
        typer.echo(json.dumps(schema_document(registry), indent=2, ensure_ascii=False))
        return
    written = write_schema_file(registry, output)
    count = sum(len(versions) for versions in written["events"].values())
    types = len(written["events"])
    typer.echo(
        f"wrote {output}: {types} event type{'s' if types != 1 else ''}, "
        f"{count} schema{'s' if count != 1 else ''}"
    )


@app.command("check")
def schema_check(
    apps: AppsOption,
    file: FileOption = Path(DEFAULT_FILE),
    mode: Annotated[
        Mode,
        typer.Option(
            help="backward: new code can read the events stored and in flight (the "
            "default). forward: consumers built from the file can read what the code "
            "writes. full: both. As the Confluent Schema Registry means them.",
        ),
    ] = "backward",
) -> None:
    """Fail (exit 1) on an event change that stored events or running consumers could not
    survive, one line per problem; exit 0 when compatible.

    Refused: a field removed or renamed without a version bump; a new required field
    without a default (backward); a field whose type changed so that the reader no longer
    accepts what the writer writes (narrowed for backward, widened for forward, any for
    full), nested models and lists included; a version bump without an upcaster from the
    previous version, or a type removed or renamed without an upcaster (backward); a new
    version of a type old consumers read (forward). Accepted: an added optional field, a
    new event type. Run it in CI after `tidings schema export` committed the file.
    """
    registry = load_registry(apps)
    baseline = load_schema_file(file)
    problems = check(registry, baseline, mode)
    for problem in problems:
        typer.echo(str(problem))
    if problems:
        typer.echo(
            f"{len(problems)} incompatible change{'s' if len(problems) > 1 else ''} "
            f"against {file} ({mode})",
            err=True,
        )
        raise typer.Exit(1)
    current = schema_document(registry)
    types = len(current["events"])
    typer.echo(f"ok: {types} event type{'s' if types != 1 else ''} compatible with {file} ({mode})")
    if current["events"] != baseline["events"]:
        typer.echo(
            f"note: {file} is out of date; run `tidings schema export` to record the changes",
            err=True,
        )


@app.command()
def asyncapi(
    target: Annotated[
        str,
        typer.Option(
            "--app",
            metavar="MODULE[:CONTRACT]",
            help="Your tidings.asyncapi.Contract: `myapp.contract:CONTRACT` (a Contract, or a "
            "function of no arguments returning one), or `myapp.contract` when the module "
            "holds exactly one.",
        ),
    ],
    output: Annotated[
        Path,
        _output_option(
            "Where to write it (`-` for standard output). A .yaml or .yml name writes "
            "YAML (needs PyYAML); anything else JSON."
        ),
    ] = Path("asyncapi.json"),
    service: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Only this service's operations, and the channels and messages they use.",
        ),
    ] = None,
) -> None:
    """Write the AsyncAPI 3.0 document of your services: topics as channels, the event
    types on each as messages (JSON Schema payloads, CloudEvents headers), and which
    service sends or receives them as operations. AsyncAPI Studio, Generator and
    the other AsyncAPI tools read it."""
    doc = document(load_contract(target), service=service)
    if output.suffix in (".yaml", ".yml"):
        text = _yaml(doc)
    else:
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if str(output) == "-":
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    typer.echo(
        f"wrote {output}: AsyncAPI {doc['asyncapi']}, {len(doc['channels'])} channels, "
        f"{len(doc['operations'])} operations"
    )


def _yaml(doc: dict[str, Any]) -> str:
    try:
        yaml = importlib.import_module("yaml")  # optional: PyYAML is no dependency
    except ImportError:
        raise ConfigurationError(
            "writing YAML needs PyYAML (pip install pyyaml); or write .json"
        ) from None
    return str(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


# -- loading the user's code -----------------------------------------------------------------


def load_registry(targets: list[str]) -> TypeRegistry:
    """The registry `--app` values name: see `export --help`. Several are merged (a type
    and version claimed twice is an error), upcasters included."""
    registries: list[TypeRegistry] = []
    for target in targets:
        module_name, _, attribute = target.partition(":")
        if not module_name:
            raise ConfigurationError(f"--app {target!r}: name a module, e.g. myapp.events")
        if not attribute:
            import_module(module_name)  # its classes register in the default registry
            found: Any = default_registry
        else:
            found = import_target(target)
            if not isinstance(found, TypeRegistry):
                raise ConfigurationError(f"{target} is not a TypeRegistry but {found!r}")
        if all(found is not known for known in registries):
            registries.append(found)
    if not registries:
        raise ConfigurationError("name the modules with your event classes: --app MODULE")
    registry = TypeRegistry.merged(*registries)  # DuplicateEventType names a clash
    if not len(registry):
        raise ConfigurationError(
            f"no event types are registered after importing {', '.join(targets)}: "
            "name the module that declares them (or its registry, MODULE:REGISTRY)"
        )
    return registry


def load_contract(target: str) -> Contract:
    """The `Contract` `--app` names: see `asyncapi --help`."""
    module_name, _, attribute = target.partition(":")
    if not module_name:
        raise ConfigurationError(f"--app {target!r}: name a module, e.g. myapp.contract")
    if attribute:
        found = import_target(target)
        if callable(found) and not isinstance(found, Contract):
            found = found()
        if not isinstance(found, Contract):
            raise ConfigurationError(f"{target} is not a tidings.asyncapi.Contract: {found!r}")
        return found
    module = import_module(module_name)
    contracts = [value for value in vars(module).values() if isinstance(value, Contract)]
    if len(contracts) != 1:
        raise ConfigurationError(
            f"module {module_name} holds {len(contracts)} Contracts; name one: "
            f"--app {module_name}:NAME"
        )
    return contracts[0]
