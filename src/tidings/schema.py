"""The schema file: every event type's JSON Schema, committed, and the check that guards it.

```python
write_schema_file(registry, "events.schema.json")        # tidings schema export
problems = check(registry, load_schema_file("events.schema.json"), mode="backward")
for problem in problems:                                  # tidings schema check
    print(problem)    # order.placed v1: field 'email' was removed or renamed without ...
```

The file (format 1) is `{"format_version": 1, "events": {TYPE: {VERSION: JSON Schema}}}`,
types sorted by name and versions by number, each schema pydantic's `model_json_schema()`
of the class (validation mode, so a field with a default is not `required`). Users commit
it; it is the record of what stored events and running consumers were built against.

`check` compares the code's registry (new) with the file (old). The modes are the
Confluent Schema Registry's, with stored events as the old writers:

- **backward** (the default): new code reads old events (stored, or still in flight).
- **forward**: consumers built from the file read what new code writes.
- **full**: both.

Rules, for a (type, version) in both the file and the code, field by field (nested models,
list items and dict values are followed, so a path may read `address.street` or `lines[].sku`):

- a field in the file and not in the code: "removed or renamed without a version bump",
  in every mode (stored values would be silently dropped, or consumers miss a field);
- a field in the code and not in the file that is required (no default): backward and full
  (old events lack it); an added field with a default is compatible in every mode, unless the
  file's model forbids unknown fields (`extra="forbid"`), which forward and full refuse;
- a field whose type changed: the reader must accept every value the writer may write,
  so backward refuses a narrowing (new type accepts less: `int | None` to `int`, `str` to
  `int`) and forward a widening (`int` to `int | None`, a new enum value); full refuses
  both. Types are compared structurally: JSON types, string formats (`date-time`, `uuid`),
  enums and literals, `Optional` (a `null` alternative), unions, lists, dicts and nested
  models (by shape, not by name). An integer is accepted where a number is;
- a field with a default in the file and required in the code: backward and full (events
  written before the field existed may lack it).

Rules for versions and types:

- backward: every (type, version) in the file must still be readable: by a class of that
  type and version, or through upcasters to a registered class (`TypeRegistry.chain`). A
  type whose newest class moved past a stored version with no upcaster from it is "a version
  bump without an upcaster"; a type with no class left is "removed or renamed" (a rename
  needs an upcaster with `to_type`). A version read through upcasters is not compared field
  by field: the upcaster is the compatibility.
- forward: a type whose newest version in the code is newer than the file's is refused,
  as consumers that only know the file's versions cannot read it (tidings has no
  downcasters: upgrade the consumers first, then check against their new file).
- in every mode a new event type, or a type removed in forward mode, is compatible.

Writers always write every field (pydantic serializes defaults too), so making a field
optional is compatible as long as its type did not widen. Constraints (`max_length`,
`ge`, patterns) are not compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tidings.core.errors import ConfigurationError, EventDefinitionError
from tidings.core.events import Event, TypeRegistry

__all__ = [
    "FORMAT_VERSION",
    "Kind",
    "Mode",
    "Problem",
    "check",
    "event_schema",
    "load_schema_file",
    "schema_document",
    "write_schema_file",
]

FORMAT_VERSION = 1
"""The version of the file's own layout; a file of another version is refused."""

Mode = Literal["backward", "forward", "full"]
Kind = Literal["removed", "added", "required", "type", "version", "unreadable"]
MODES: tuple[Mode, ...] = ("backward", "forward", "full")

_COMMENT = (
    "Written by `tidings schema export`; commit it. `tidings schema check` fails CI on an "
    "event change that stored events or running consumers could not survive."
)


@dataclass(frozen=True, slots=True)
class Problem:
    """One incompatibility: the type and version it is in, the field (if any), and what."""

    type: str
    version: int
    field: str | None
    message: str
    mode: Literal["backward", "forward"]
    """The direction that found it: new code reading old events, or old consumers new ones."""
    kind: Kind
    """What changed: a field `removed`, `added` (required), made `required`, of another
    `type`; a `version` old consumers do not know; a stored version now `unreadable`."""

    def __str__(self) -> str:
        return f"{self.type} v{self.version}: {self.message}"


# -- the file --------------------------------------------------------------------------------


def event_schema(cls: type[Event]) -> dict[str, Any]:
    """The JSON Schema of one event class, as the file keeps it (self-contained `$defs`)."""
    return cls.model_json_schema()


def schema_document(registry: TypeRegistry) -> dict[str, Any]:
    """The file's content for `registry`: every registered type and version, sorted."""
    events: dict[str, dict[str, Any]] = {}
    for cls in registry:  # sorted by (type, version)
        assert cls.__event_type__ is not None
        events.setdefault(cls.__event_type__, {})[str(cls.__event_version__)] = event_schema(cls)
    return {"$comment": _COMMENT, "format_version": FORMAT_VERSION, "events": events}


def write_schema_file(registry: TypeRegistry, path: str | Path) -> dict[str, Any]:
    """Write `schema_document(registry)` to `path` (stable text: diffs show real changes)."""
    document = schema_document(registry)
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    Path(path).write_text(text, encoding="utf-8")
    return document


def load_schema_file(path: str | Path) -> dict[str, Any]:
    """Read a schema file; `ConfigurationError` naming the problem if missing or malformed."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(
            f"{path} does not exist: run `tidings schema export` and commit the file"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("events"), dict):
        raise ConfigurationError(f"{path} is not a tidings schema file (no 'events' object)")
    if document.get("format_version") != FORMAT_VERSION:
        raise ConfigurationError(
            f"{path} has format_version {document.get('format_version')!r}; this tidings "
            f"reads {FORMAT_VERSION}"
        )
    for type_, versions in document["events"].items():
        if not isinstance(versions, dict) or not all(
            key.isdigit() and isinstance(value, dict) for key, value in versions.items()
        ):
            raise ConfigurationError(f"{path}: {type_!r} must map versions to JSON Schemas")
    return document


# -- the check -------------------------------------------------------------------------------


def check(
    registry: TypeRegistry, document: Mapping[str, Any], mode: Mode = "backward"
) -> list[Problem]:
    """The incompatibilities between `registry` (the code) and a schema file's `document`
    in `mode`; an empty list when compatible. See the module docstring for the rules."""
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


# -- comparing JSON Schemas ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Side:
    """A schema with the `$defs` its `$ref`s point into."""

    schema: Mapping[str, Any]
    defs: Mapping[str, Any]

    def at(self, schema: Mapping[str, Any]) -> _Side:
        return _Side(schema, self.defs)


def _compare(
    type_: str,
    version: int,
    old_schema: Mapping[str, Any],
    new_schema: Mapping[str, Any],
    direction: Literal["backward", "forward"],
) -> list[Problem]:
    """Problems found when the `direction`'s reader reads the writer's events."""
    old = _Side(old_schema, old_schema.get("$defs", {}))
    new = _Side(new_schema, new_schema.get("$defs", {}))
    found: list[tuple[Kind, str, str]] = []
    _compare_models(old, new, "", direction, found, set())
    return [
        Problem(type_, version, path, message, direction, kind) for kind, path, message in found
    ]


def _resolve(side: _Side) -> _Side:
    """Follow `$ref`s (and pydantic's one-item `allOf` wrappers) to the schema itself."""
    schema = side.schema
    for _ in range(64):
        if "$ref" in schema:
            ref = str(schema["$ref"])
            name = ref.rsplit("/", 1)[-1]
            if not ref.startswith("#/$defs/") or name not in side.defs:
                return side.at({})  # a reference we cannot follow: treated as any value
            schema = side.defs[name]
        elif "allOf" in schema and len(schema["allOf"]) == 1:
            schema = schema["allOf"][0]
        else:
            break
    return side.at(schema)


def _alternatives(side: _Side) -> list[_Side]:
    """A schema as a flat list of alternatives: unions split, type lists split."""
    side = _resolve(side)
    schema = side.schema
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return [alt for item in schema[key] for alt in _alternatives(side.at(item))]
    kinds = schema.get("type")
    if isinstance(kinds, list):
        return [side.at({**schema, "type": kind}) for kind in kinds]
    return [side]


def _kind(schema: Mapping[str, Any]) -> str:
    """One alternative's kind: enum, model, map, array, a JSON type, or any."""
    if "enum" in schema or "const" in schema:
        return "enum"
    kind = schema.get("type")
    if kind == "object" or (kind is None and "properties" in schema):
        return "model" if "properties" in schema else "map"
    if isinstance(kind, str):
        return kind
    return "any"


def _enum_values(schema: Mapping[str, Any]) -> list[Any]:
    return list(schema["enum"]) if "enum" in schema else [schema["const"]]


def _value_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "map"


def _accepts(reader: _Side, writer: _Side, seen: set[tuple[int, int]]) -> bool:
    """Whether every value `writer` allows is one `reader` allows (structurally)."""
    return all(
        any(_accepts_one(r, w, seen) for r in _alternatives(reader)) for w in _alternatives(writer)
    )


def _accepts_one(reader: _Side, writer: _Side, seen: set[tuple[int, int]]) -> bool:
    r, w = reader.schema, writer.schema
    rk, wk = _kind(r), _kind(w)
    if rk == "any":
        return True
    if wk == "any":
        return False
    if wk == "enum":
        written = _enum_values(w)
        if rk == "enum":
            allowed = [json.dumps(v, sort_keys=True) for v in _enum_values(r)]
            return all(json.dumps(v, sort_keys=True) in allowed for v in written)
        return all(_kind_accepts(rk, _value_kind(v)) for v in written)
    if rk == "enum":
        return False
    if rk in ("model", "map") and wk in ("model", "map"):
        key = (id(r), id(w))
        if key in seen:  # a recursive model: assume the rest of the loop holds
            return True
        seen = seen | {key}
        if rk == "model" and wk == "model":
            found: list[tuple[Kind, str, str]] = []
            _compare_models_reading(reader, writer, "", found, seen)
            return not found
        if rk == "map":
            value_side = reader.at(r.get("additionalProperties") or {})
            if wk == "map":
                return _accepts(value_side, writer.at(w.get("additionalProperties") or {}), seen)
            fields = (w.get("properties") or {}).values()
            return all(_accepts(value_side, writer.at(s), seen) for s in fields)
        return False  # a model reader, a free-form dict writer
    if rk == "array" and wk == "array":
        return _accepts(reader.at(_items(r)), writer.at(_items(w)), seen)
    if not _kind_accepts(rk, wk):
        return False
    # A format (uuid, date-time) narrows a string: a writer without it may write any string.
    return rk != "string" or not r.get("format") or r.get("format") == w.get("format")


def _kind_accepts(reader: str, writer: str) -> bool:
    return reader == writer or (reader == "number" and writer == "integer")


def _items(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """An array's item schema (a tuple's items as a union)."""
    if "prefixItems" in schema:
        each = list(schema["prefixItems"])
        if isinstance(schema.get("items"), dict):
            each.append(schema["items"])
        return {"anyOf": each}
    items = schema.get("items")
    return items if isinstance(items, dict) else {}


def _describe(side: _Side, depth: int = 0) -> str:
    """A short name for a schema's type: `integer | null`, `array of string`, `Address`."""
    parts: list[str] = []
    for alt in _alternatives(side):
        s = alt.schema
        kind = _kind(s)
        if kind == "enum":
            text = " | ".join(json.dumps(v) for v in _enum_values(s))
            parts.append(text if len(text) <= 60 else text[:57] + "...")
        elif kind == "model":
            parts.append(str(s.get("title", "object")))
        elif kind == "map":
            values = s.get("additionalProperties")
            inner = _describe(alt.at(values), depth + 1) if isinstance(values, dict) else "any"
            parts.append(f"object of {inner}" if depth < 2 else "object")
        elif kind == "array":
            parts.append(f"array of {_describe(alt.at(_items(s)), depth + 1)}")
        elif kind == "string" and s.get("format"):
            parts.append(f"string ({s['format']})")
        else:
            parts.append(kind)
    unique = list(dict.fromkeys(parts))
    if len(unique) > 1 and depth:
        return "(" + " | ".join(unique) + ")"
    return " | ".join(unique)


def _compare_models(
    old: _Side,
    new: _Side,
    prefix: str,
    direction: Literal["backward", "forward"],
    found: list[tuple[Kind, str, str]],
    seen: set[tuple[int, int]],
) -> None:
    """The problems, field by field, of the direction's reader reading its writer."""
    if direction == "backward":
        _compare_models_reading(new, old, prefix, found, seen, old_is_writer=True)
    else:
        _compare_models_reading(old, new, prefix, found, seen, old_is_writer=False)


def _compare_models_reading(
    reader: _Side,
    writer: _Side,
    prefix: str,
    found: list[tuple[Kind, str, str]],
    seen: set[tuple[int, int]],
    *,
    old_is_writer: bool = True,
) -> None:
    """Compare two models' fields; messages speak of the old (file) and new (code) side."""
    reader, writer = _resolve(reader), _resolve(writer)
    old, new = (writer, reader) if old_is_writer else (reader, writer)
    old_fields: Mapping[str, Any] = old.schema.get("properties") or {}
    new_fields: Mapping[str, Any] = new.schema.get("properties") or {}
    old_required = set(old.schema.get("required") or ())
    new_required = set(new.schema.get("required") or ())
    reader_required, writer_required = new_required, old_required  # used when old writes
    for name in old_fields:
        if name not in new_fields:
            found.append(
                (
                    "removed",
                    prefix + name,
                    f"field '{prefix}{name}' was removed or renamed without a version bump",
                )
            )
    for name in new_fields:
        if name in old_fields:
            continue
        if old_is_writer and name in new_required:
            found.append(
                (
                    "added",
                    prefix + name,
                    f"new required field '{prefix}{name}' has no default: stored events "
                    "lack it (give it a default, or bump the version with an upcaster)",
                )
            )
        elif not old_is_writer and old.schema.get("additionalProperties") is False:
            found.append(
                (
                    "added",
                    prefix + name,
                    f"new field '{prefix}{name}': consumers built on the file forbid "
                    "unknown fields (extra='forbid')",
                )
            )
    for name, old_field in old_fields.items():
        if name not in new_fields:
            continue
        path = prefix + name
        r_field = new_fields[name] if old_is_writer else old_field
        w_field = old_field if old_is_writer else new_fields[name]
        if old_is_writer and name in reader_required and name not in writer_required:
            found.append(
                (
                    "required",
                    path,
                    f"field '{path}' became required: events written without it could no "
                    "longer be read",
                )
            )
        _compare_values(reader.at(r_field), writer.at(w_field), path, found, seen, old_is_writer)


def _compare_values(
    reader: _Side,
    writer: _Side,
    path: str,
    found: list[tuple[Kind, str, str]],
    seen: set[tuple[int, int]],
    old_is_writer: bool,
) -> None:
    """Compare one field's values: into nested models and containers where both sides have
    the same single shape, as a whole type otherwise."""
    r_alts = [a for a in _alternatives(reader) if _kind(a.schema) != "null"]
    w_alts = [a for a in _alternatives(writer) if _kind(a.schema) != "null"]
    r_null = len(r_alts) < len(_alternatives(reader))
    w_null = len(w_alts) < len(_alternatives(writer))
    if len(r_alts) == 1 and len(w_alts) == 1 and w_null <= r_null:
        r, w = r_alts[0], w_alts[0]
        kind = _kind(r.schema)
        if kind == _kind(w.schema) and kind in ("model", "array", "map"):
            key = (id(r.schema), id(w.schema))
            if key in seen:
                return
            seen = seen | {key}
            if kind == "model":
                _compare_models_reading(r, w, path + ".", found, seen, old_is_writer=old_is_writer)
            elif kind == "array":
                _compare_values(
                    r.at(_items(r.schema)),
                    w.at(_items(w.schema)),
                    path + "[]",
                    found,
                    seen,
                    old_is_writer,
                )
            else:
                _compare_values(
                    r.at(r.schema.get("additionalProperties") or {}),
                    w.at(w.schema.get("additionalProperties") or {}),
                    path + "{}",
                    found,
                    seen,
                    old_is_writer,
                )
            return
    if _accepts(reader, writer, seen):
        return
    old, new = (writer, reader) if old_is_writer else (reader, writer)
    if old_is_writer:
        why = "the new type does not accept every stored value"
    else:
        why = "consumers built on the file do not accept every value the new type allows"
    found.append(
        (
            "type",
            path,
            f"field '{path}' changed type from {_describe(old)} to {_describe(new)}: {why}",
        )
    )
