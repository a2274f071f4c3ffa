"""Dynamic consistency boundaries: which events a decision depends on, and the condition its
append is made on (the DCB specification, dcb.events).

```python
q = Query(QueryItem(types=[CourseDefined, Subscribed], tags=["course:c1"]))
read = await store.read_query(q)            # the events, and the head it is complete up to
await store.append("student-7", [Subscribed(course="c1", student="7")],
                   condition=AppendCondition(q, after=read.head))   # or AppendConditionFailed
```

(`head = await store.last_position()` before `read_all(query=q)` works as well.)

A `QueryItem` matches an event whose type is among its `types` (none: any type) and that
carries every one of its `tags`; a `Query` matches what any of its items matches, and with no
items it matches every event. No I/O here: stores turn a query into a `Selection` of type
names (with the older names upcasters rename) and tags, and read or check it their own way.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, NamedTuple

from tidings.core.events import Event, TypeRegistry

__all__ = ["AppendCondition", "Query", "QueryItem", "Selection"]


def _names(types: Iterable[type[Event] | str] | None) -> frozenset[str] | None:
    if types is None:
        return None
    if isinstance(types, (str, bytes)) or not isinstance(types, Iterable):
        raise TypeError(f"types= takes a list of Event classes or type names, not {types!r}")
    names = set()
    for item in types:
        if isinstance(item, str) and item:
            names.add(item)
        elif isinstance(item, type) and issubclass(item, Event) and item.__event_type__:
            names.add(item.__event_type__)
        else:
            raise TypeError(f"types= takes Event classes or type names, not {item!r}")
    return frozenset(names) or None  # an empty list, like none, means any type


class QueryItem:
    """Events of one of `types` (classes or type names; none means any type) that carry
    every one of `tags` (none means any tags)."""

    __slots__ = ("tags", "types")

    types: frozenset[str] | None
    tags: tuple[str, ...]

    def __init__(
        self,
        types: Iterable[type[Event] | str] | None = None,
        tags: Iterable[str] | None = None,
    ) -> None:
        if isinstance(tags, (str, bytes)):
            raise TypeError(f"tags= takes a list of tags, not the single string {tags!r}")
        found = tuple(dict.fromkeys(tags or ()))
        for tag in found:
            if not isinstance(tag, str) or not tag:
                raise TypeError(f"a query's tags are non-empty strings, not {tag!r}")
        object.__setattr__(self, "types", _names(types))
        object.__setattr__(self, "tags", found)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("QueryItem is immutable")

    def matches(self, type: str, tags: Collection[str]) -> bool:
        """Whether an event of `type` carrying `tags` matches this item (by name, as stored)."""
        if self.types is not None and type not in self.types:
            return False
        return all(tag in tags for tag in self.tags)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QueryItem):
            return NotImplemented
        return (self.types, set(self.tags)) == (other.types, set(other.tags))

    def __hash__(self) -> int:
        return hash((self.types, frozenset(self.tags)))

    def __repr__(self) -> str:
        types = sorted(self.types) if self.types is not None else None
        return f"QueryItem(types={types!r}, tags={list(self.tags)!r})"


class Query:
    """The events a decision depends on: those any of `items` matches (`Query()`: all)."""

    __slots__ = ("items",)

    items: tuple[QueryItem, ...]

    def __init__(self, *items: QueryItem) -> None:
        for item in items:
            if not isinstance(item, QueryItem):
                raise TypeError(f"Query(...) takes QueryItem arguments, not {item!r}")
        object.__setattr__(self, "items", tuple(dict.fromkeys(items)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Query is immutable")

    @classmethod
    def all(cls) -> Query:
        """The query every event matches."""
        return cls()

    def matches(self, type: str, tags: Collection[str]) -> bool:
        """Whether an event of `type` carrying `tags` matches (by stored name)."""
        return not self.items or any(item.matches(type, tags) for item in self.items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Query):
            return NotImplemented
        return set(self.items) == set(other.items)

    def __hash__(self) -> int:
        return hash(frozenset(self.items))

    def __repr__(self) -> str:
        return f"Query({', '.join(map(repr, self.items))})"


class AppendCondition:
    """Append only if no event matching `query` was stored after position `after`.

    `after` is the position the decision read up to (`read_query(...).head`, or
    `last_position()` taken before reading);
    None means no matching event may exist at all. Checked and written atomically: the store
    raises `AppendConditionFailed` and stores nothing when a matching event is there.
    """

    __slots__ = ("after", "query")

    query: Query
    after: int | None

    def __init__(self, query: Query, after: int | None = None) -> None:
        if not isinstance(query, Query):
            raise TypeError(f"AppendCondition takes a Query, not {query!r}")
        if after is not None and (isinstance(after, bool) or not isinstance(after, int)):
            raise TypeError(f"AppendCondition(after=) is a position (int) or None, not {after!r}")
        if after is not None and after < 0:
            raise ValueError(f"AppendCondition(after={after}): positions are >= 0")
        object.__setattr__(self, "query", query)
        object.__setattr__(self, "after", after)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("AppendCondition is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AppendCondition):
            return NotImplemented
        return (self.query, self.after) == (other.query, other.after)

    def __hash__(self) -> int:
        return hash((self.query, self.after))

    def __repr__(self) -> str:
        return f"AppendCondition({self.query!r}, after={self.after!r})"


class Selection(NamedTuple):
    """A query as a store reads it: per item, the stored type names (None: any) and tags.

    Built by `Selection.of`, which adds the older type names that upcasters lead to the
    query's types, so events stored before a rename still match."""

    items: tuple[tuple[frozenset[str] | None, tuple[str, ...]], ...]

    @classmethod
    def of(
        cls,
        query: Query | None,
        registry: TypeRegistry,
        types: frozenset[str] | None = None,
    ) -> Selection | None:
        """`query` (and a `types=` filter, both must hold) for `registry`; None when they
        select every event."""
        items = [(i.types, i.tags) for i in query.items] if query is not None else []
        if not items:
            items = [(None, ())]
        if types is not None:
            items = [(types if t is None else t & types, tags) for t, tags in items]
        resolved = tuple(
            (registry.with_sources(t) if t is not None else None, tags) for t, tags in items
        )
        if any(t is None and not tags for t, tags in resolved):
            return None
        return cls(resolved)

    def matches(self, type: str, tags: Collection[str]) -> bool:
        """Whether a stored event of `type` with `tags` is selected."""
        for names, wanted in self.items:
            if (names is None or type in names) and all(tag in tags for tag in wanted):
                return True
        return False
