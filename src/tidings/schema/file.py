"""The schema file: its layout (format 1), written from a registry, read back and validated.

Apart from the check: exporting and loading the file need none of the compatibility rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tidings.core.errors import ConfigurationError
from tidings.core.events import Event, TypeRegistry

FORMAT_VERSION = 1
"""The version of the file's own layout; a file of another version is refused."""

_COMMENT = (
    "Written by `tidings schema export`; commit it. `tidings schema check` fails CI on an "
    "event change that stored events or running consumers could not survive."
)


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
