"""`check`: the code's registry against a schema file, in a mode, and the rules for versions
and types (a stored version still readable, a bump with its upcaster, a version consumers do
not know). Fields are compared in `compare`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from tidings.core.errors import ConfigurationError, EventDefinitionError
from tidings.core.events import TypeRegistry
from tidings.schema.compare import _compare
from tidings.schema.file import event_schema
from tidings.schema.problems import MODES, Mode, Problem


def check(
    registry: TypeRegistry, document: Mapping[str, Any], mode: Mode = "backward"
) -> list[Problem]:
    """The incompatibilities between `registry` (the code) and a schema file's `document`
    in `mode`; an empty list when compatible. See `tidings.schema` for the rules."""
    if mode not in MODES:
        raise ConfigurationError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    directions: list[Literal["backward", "forward"]] = (
        ["backward", "forward"] if mode == "full" else [mode]
    )
    old: dict[tuple[str, int], dict[str, Any]] = {
        (type_, int(version)): schema
        for type_, versions in document["events"].items()
        for version, schema in versions.items()
    }
    new_newest: dict[str, int] = {}
    for registered in registry:
        assert registered.__event_type__ is not None
        new_newest[registered.__event_type__] = registered.__event_version__
    problems: list[Problem] = []
    old_newest: dict[str, int] = {}
    for type_, version in old:
        old_newest[type_] = max(version, old_newest.get(type_, 0))
    for (type_, version), old_schema in sorted(old.items()):
        cls = registry.find(type_, version)
        if "backward" in directions:
            bumped = version == old_newest[type_] and new_newest.get(type_, 0) > version
            if bumped:
                readable = _bumped(registry, type_, version, new_newest[type_], problems)
            else:
                readable = _readable(registry, type_, version, new_newest, problems)
            if readable and cls is not None and not registry.upcaster(type_, version):
                problems += _compare(type_, version, old_schema, event_schema(cls), "backward")
        if "forward" in directions and cls is not None:
            problems += _compare(type_, version, old_schema, event_schema(cls), "forward")
    if "forward" in directions:
        for type_, newest in sorted(new_newest.items()):
            known = old_newest.get(type_)
            if known is not None and newest > known:
                problems.append(
                    Problem(
                        type_,
                        newest,
                        None,
                        f"is a new version; consumers that know only v{known} cannot read it "
                        "(forward compatibility allows no version bump: upgrade them first)",
                        "forward",
                        "version",
                    )
                )
    return sorted(_unique(problems), key=lambda p: (p.type, p.version))


def _unique(problems: Iterable[Problem]) -> list[Problem]:
    """One problem per (type, version, field, kind): full mode finds some in both directions."""
    seen: set[tuple[str, int, str | None, str]] = set()
    out: list[Problem] = []
    for problem in problems:
        key = (problem.type, problem.version, problem.field or problem.message, problem.kind)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out


def _bumped(
    registry: TypeRegistry, type_: str, version: int, newest: int, problems: list[Problem]
) -> bool:
    """Whether the file's newest `version` of a type the code bumped to `newest` is read as
    the newest (through upcasters); a Problem when not. Returns whether it still decodes."""
    try:
        found = registry.chain(type_, version)
    except EventDefinitionError as exc:  # upcasters going round in a loop
        problems.append(Problem(type_, version, None, str(exc), "backward", "unreadable"))
        return False
    target = registry.find(type_, newest)
    if found is not None and found[1] is target:
        return True
    at_type, at_version = type_, version
    while (step := registry.upcaster(at_type, at_version)) is not None:
        at_type, at_version = step.to_type, step.to_version
    if found is None:
        outcome = "could no longer be read"
    else:
        outcome = f"would still be read as v{found[1].__event_version__}, not as v{newest}"
    problems.append(
        Problem(
            type_,
            version,
            None,
            f"bumped to v{newest} without an upcaster from "
            f"{'' if at_type == type_ else at_type + ' '}v{at_version}: stored v{version} "
            f"events {outcome}",
            "backward",
            "version",
        )
    )
    return found is not None


def _readable(
    registry: TypeRegistry,
    type_: str,
    version: int,
    newest: Mapping[str, int],
    problems: list[Problem],
) -> bool:
    """Whether stored (type, version) events still decode; a Problem when not."""
    try:
        found = registry.chain(type_, version)
    except EventDefinitionError as exc:  # upcasters going round in a loop
        problems.append(Problem(type_, version, None, str(exc), "backward", "unreadable"))
        return False
    if found is not None:
        return True
    # Walk the steps to where they stop, to name the missing one.
    at_type, at_version = type_, version
    while (step := registry.upcaster(at_type, at_version)) is not None:
        at_type, at_version = step.to_type, step.to_version
    if at_type in newest and newest[at_type] > at_version:
        message = (
            f"the code's newest is v{newest[at_type]} but there is no upcaster from "
            f"{'' if at_type == type_ else at_type + ' '}v{at_version}: stored events of "
            "this version could no longer be read (a version bump without an upcaster)"
        )
    elif (at_type, at_version) != (type_, version):
        message = (
            f"its upcasters lead to {at_type} v{at_version}, which has no class and no "
            "upcaster: stored events of this version could no longer be read"
        )
    else:
        message = (
            "the event type or version was removed or renamed: stored events of it could no "
            "longer be read (keep the class, or add an upcaster, with to_type= for a rename)"
        )
    problems.append(Problem(type_, version, None, message, "backward", "unreadable"))
    return False
