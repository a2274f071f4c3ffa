"""The rules for fields: two JSON Schemas compared structurally, reader against writer, into
nested models, lists and dicts (`$ref`s followed), each difference a `Problem`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tidings.schema.problems import Kind, Problem


@dataclass(frozen=True, slots=True)
class _Side:
    """A schema with the `$defs` its `$ref`s point into."""

    schema: Mapping[str, Any]
    defs: Mapping[str, Any]

    def at(self, schema: Mapping[str, Any]) -> _Side:
        return _Side(schema, self.defs)


@dataclass(frozen=True, slots=True)
class _Walk:
    """One comparison under way: what it found, the pairs of models it is inside (so a
    recursive model ends), and which side writes (the old one: backward)."""

    found: list[tuple[Kind, str, str]]
    seen: frozenset[tuple[int, int]] = frozenset()
    old_is_writer: bool = True

    def add(self, kind: Kind, path: str, message: str) -> None:
        self.found.append((kind, path, message))

    def into(self, key: tuple[int, int]) -> _Walk | None:
        """The walk one level down into the pair `key`; None if already inside it."""
        if key in self.seen:
            return None
        return _Walk(self.found, self.seen | {key}, self.old_is_writer)


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
    if direction == "backward":  # the new code reads what the old wrote
        _compare_models_reading(new, old, "", _Walk(found, old_is_writer=True))
    else:
        _compare_models_reading(old, new, "", _Walk(found, old_is_writer=False))
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


def _accepts(reader: _Side, writer: _Side, seen: frozenset[tuple[int, int]]) -> bool:
    """Whether every value `writer` allows is one `reader` allows (structurally)."""
    return all(
        any(_accepts_one(r, w, seen) for r in _alternatives(reader)) for w in _alternatives(writer)
    )


def _accepts_one(reader: _Side, writer: _Side, seen: frozenset[tuple[int, int]]) -> bool:
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
            _compare_models_reading(reader, writer, "", _Walk(found, seen))
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


def _compare_models_reading(reader: _Side, writer: _Side, prefix: str, walk: _Walk) -> None:
    """Compare two models' fields; messages speak of the old (file) and new (code) side."""
    old_is_writer = walk.old_is_writer
    reader, writer = _resolve(reader), _resolve(writer)
    old, new = (writer, reader) if old_is_writer else (reader, writer)
    old_fields: Mapping[str, Any] = old.schema.get("properties") or {}
    new_fields: Mapping[str, Any] = new.schema.get("properties") or {}
    old_required = set(old.schema.get("required") or ())
    new_required = set(new.schema.get("required") or ())
    reader_required, writer_required = new_required, old_required  # used when old writes
    for name in old_fields:
        if name not in new_fields:
            walk.add(
                "removed",
                prefix + name,
                f"field '{prefix}{name}' was removed or renamed without a version bump",
            )
    for name in new_fields:
        if name in old_fields:
            continue
        if old_is_writer and name in new_required:
            walk.add(
                "added",
                prefix + name,
                f"new required field '{prefix}{name}' has no default: stored events "
                "lack it (give it a default, or bump the version with an upcaster)",
            )
        elif not old_is_writer and old.schema.get("additionalProperties") is False:
            walk.add(
                "added",
                prefix + name,
                f"new field '{prefix}{name}': consumers built on the file forbid "
                "unknown fields (extra='forbid')",
            )
    for name, old_field in old_fields.items():
        if name not in new_fields:
            continue
        path = prefix + name
        r_field = new_fields[name] if old_is_writer else old_field
        w_field = old_field if old_is_writer else new_fields[name]
        if old_is_writer and name in reader_required and name not in writer_required:
            walk.add(
                "required",
                path,
                f"field '{path}' became required: events written without it could no "
                "longer be read",
            )
        _compare_values(reader.at(r_field), writer.at(w_field), path, walk)


def _compare_values(reader: _Side, writer: _Side, path: str, walk: _Walk) -> None:
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
            inner = walk.into((id(r.schema), id(w.schema)))
            if inner is None:
                return
            if kind == "model":
                _compare_models_reading(r, w, path + ".", inner)
            elif kind == "array":
                _compare_values(r.at(_items(r.schema)), w.at(_items(w.schema)), path + "[]", inner)
            else:
                values = r.at(r.schema.get("additionalProperties") or {})
                written = w.at(w.schema.get("additionalProperties") or {})
                _compare_values(values, written, path + "{}", inner)
            return
    if _accepts(reader, writer, walk.seen):
        return
    old, new = (writer, reader) if walk.old_is_writer else (reader, writer)
    if walk.old_is_writer:
        why = "the new type does not accept every stored value"
    else:
        why = "consumers built on the file do not accept every value the new type allows"
    walk.add(
        "type",
        path,
        f"field '{path}' changed type from {_describe(old)} to {_describe(new)}: {why}",
    )
