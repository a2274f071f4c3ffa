"""Reading a `Selection` (a DCB query, or a `types=` filter) through the SQL stores' indexes.

Both SQL stores keep an event's tags twice: with the event (read back as
`RecordedEvent.tags`) and one row per tag in `tidings_tags (tag, position)`, whose primary key
is the tag index; `tidings_events (type, position)` is the type index. A selection becomes a
union of index range reads, one per item (by its first tag) or per type name, each already
in position order and cut at the batch size, so reading 100 tagged events of a million reads
about 100 index entries, never the log. The SQL is written here once for both dialects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tidings.core.query import Selection

__all__ = ["Placeholders", "selected_positions"]


class Placeholders:
    """Collects a statement's parameters and names each for the dialect: `:v1`, `:v2`, ...
    (SQLite, passed as `named`) or `$1`, `$2`, ... (PostgreSQL, passed as `values`). A name
    may be used more than once in the text."""

    def __init__(self, numbered: bool) -> None:
        self.values: list[Any] = []
        self._numbered = numbered

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}" if self._numbered else f":v{len(self.values)}"

    @property
    def named(self) -> dict[str, Any]:
        return {f"v{i}": value for i, value in enumerate(self.values, start=1)}


def selected_positions(
    selection: Selection,
    mark: Callable[[Any], str],
    *,
    after: str,
    limit: str,
    until: str | None = None,
    events: str = "tidings_events",
    tags: str = "tidings_tags",
) -> str:
    """A `SELECT p` of the selected positions after `after` (and up to `until`), in no
    particular order, at most `limit` per branch: the caller orders and cuts the union.

    `after`, `until` and `limit` are SQL expressions (placeholders the caller made); values
    of the selection go through `mark`, in the order the SQL text uses them.
    """
    branches = []
    for names, wanted in selection.items:
        if wanted:
            first, *rest = wanted
            where = [f"t.tag = {mark(first)}", f"t.position > {after}"]
            if until is not None:
                where.append(f"t.position <= {until}")
            for tag in rest:
                where.append(
                    f"EXISTS (SELECT 1 FROM {tags} u WHERE u.tag = {mark(tag)} "
                    "AND u.position = t.position)"
                )
            if names is not None:
                listed = ", ".join(mark(name) for name in sorted(names)) or "NULL"
                where.append(  # by the event's key alone: no plan can scan a type for it
                    f"(SELECT e.type FROM {events} e WHERE e.position = t.position) "
                    f"IN ({listed})"
                )
            branches.append(
                f"SELECT t.position AS p FROM {tags} t WHERE {' AND '.join(where)} "
                f"ORDER BY t.position LIMIT {limit}"
            )
            continue
        for name in sorted(names or ()):  # a types-only item: one index range per type
            bound = f" AND position <= {until}" if until is not None else ""
            branches.append(
                f"SELECT position AS p FROM {events} WHERE type = {mark(name)} "
                f"AND position > {after}{bound} ORDER BY position LIMIT {limit}"
            )
    if not branches:  # only empty type lists: nothing can match
        return f"SELECT position AS p FROM {events} WHERE 0 = 1"
    return " UNION ".join(
        f"SELECT b{i}.p FROM ({branch}) AS b{i}" for i, branch in enumerate(branches)
    )
