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

The package, by concern:

- `problems.py`: the modes, and `Problem`: one incompatibility found.
- `file.py`: the file itself: `schema_document`, `write_schema_file`, `load_schema_file`.
- `compat.py`: `check`, and the rules for versions and types (readable, bumped, new).
- `compare.py`: the rules for fields: two JSON Schemas compared structurally.
"""

from __future__ import annotations

from tidings.schema.compat import check
from tidings.schema.file import (
    FORMAT_VERSION,
    event_schema,
    load_schema_file,
    schema_document,
    write_schema_file,
)
from tidings.schema.problems import MODES as MODES
from tidings.schema.problems import Kind, Mode, Problem

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
