"""Projections, the read side of CQRS: fold the event log into a read model built for queries.

```python
class OrdersByUser(Projection, name="orders_by_user"):
    @on(OrderPlaced)
    def placed(self, event: OrderPlaced, record: RecordedEvent) -> None:
        orders = self.view.get(event.user_id, [])
        orders.append(event.order_id)
        self.view.put(event.user_id, orders)
```

The read model is a set of JSON documents by key, kept in the store's own database, so a
`ProjectionRunner` commits a batch's document writes together with the projection's checkpoint
in one transaction: a crash between the two cannot lose or double-apply an event. Queries go
through `ReadModel`. A projection that writes somewhere else (another database, a search
index) gets no such guarantee: after a crash it sees the last batch again, so its writes must
be idempotent (upserts keyed by the event's id, stream and version), as docs/cqrs.md shows.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, ClassVar

import pydantic_core

from tidings.app.handlers import HandlerTable
from tidings.core.errors import ConfigurationError, ProjectionError, StoreError
from tidings.core.recorded import RecordedEvent
from tidings.store.base import DocumentNotLoaded, EventStore, StoreBase

__all__ = ["Projection", "ReadModel", "View"]

_MISSING: Any = object()  # a deleted document
_ABSENT: Any = object()  # not written in this batch


class View:
    """A projection's read model while one batch is applied: reads see this batch's writes.

    Documents are JSON values (dicts, lists, strings, numbers, pydantic models); what `get`
    returns after a `put` in the same batch is the very object put.
    """

    def __init__(self, reader: Callable[[str], str | None]) -> None:
        self._reader = reader
        self._writes: dict[str, Any] = {}
        # A reader that can only read with `await` (PostgreSQL) raises DocumentNotLoaded;
        # the event is then undone, the key loaded, and the event applied again.
        self._can_miss = hasattr(reader, "load")
        self._undo: dict[str, Any] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """The document stored under `key`, or `default`."""
        if key in self._writes:
            self._remember(key)
            value = self._writes[key]
            return default if value is _MISSING else value
        raw = self._reader(_check_key(key))
        return default if raw is None else json.loads(raw)

    def put(self, key: str, document: Any) -> None:
        """Store `document` under `key` (replacing what was there) when the batch commits."""
        self._remember(_check_key(key))
        self._writes[key] = document

    def delete(self, key: str) -> None:
        """Remove the document under `key` when the batch commits."""
        self._remember(_check_key(key))
        self._writes[key] = _MISSING

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, _MISSING) is not _MISSING

    def encoded(self) -> dict[str, str | None]:
        """The batch's writes as JSON text (None for a delete), for the store."""
        return {
            key: None if value is _MISSING else pydantic_core.to_json(value).decode()
            for key, value in self._writes.items()
        }

    # -- applying one event again after a document had to be loaded ------------------------

    def begin_event(self) -> None:
        """Start recording what the next event changes, so it can be undone."""
        if self._can_miss:
            self._undo = {}

    def _remember(self, key: str) -> None:
        undo = self._undo
        if undo is not None and key not in undo:
            undo[key] = copy.deepcopy(self._writes[key]) if key in self._writes else _ABSENT

    def undo_event(self) -> None:
        """Put back what the current event changed (including objects it mutated)."""
        for key, before in (self._undo or {}).items():
            if before is _ABSENT:
                self._writes.pop(key, None)
            else:
                self._writes[key] = before
        self._undo = {}

    async def load(self, key: str) -> None:
        """Load `key` into an awaitable reader's cache."""
        await self._reader.load([key])  # type: ignore[attr-defined]


class _Detached(View):
    """Stands in for `view` outside a batch, to say why nothing can be written."""

    def __init__(self, name: str) -> None:
        super().__init__(self._refuse)
        self.name = name

    def _refuse(self, key: str) -> str | None:
        raise ConfigurationError(
            f"projection {self.name!r}: its view is only usable inside a handler run by a "
            "ProjectionRunner; query a read model with ReadModel(store, ...)"
        )

    def put(self, key: str, document: Any) -> None:
        self._refuse(key)

    def delete(self, key: str) -> None:
        self._refuse(key)


class Projection:
    """Base class of projections; `name=` (default: the class name in snake case) identifies
    its checkpoint and read model, so renaming it starts a new projection from the beginning.

    Handlers are `@on` methods, sync or async, taking `(self, event)` or
    `(self, event, record)`; event types without a handler are skipped.
    """

    name: str = "projection"
    segments: int = 1
    """Segments the projection is split into (`segments=4`): each stream's events go to one
    (`tidings.app.segments.segment_of`), each segment has its own checkpoint and lease, so
    several workers share one projection. A document must belong to one stream's segment."""
    __handlers__: ClassVar[HandlerTable]

    def __init_subclass__(
        cls, *, name: str | None = None, segments: int | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
        elif "name" not in cls.__dict__:
            cls.name = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", cls.__name__).lower()
        if segments is not None:
            if (
                isinstance(segments, bool)
                or not isinstance(segments, int)
                or not 1 <= segments <= 1024
            ):
                raise ConfigurationError(
                    f"{cls.__qualname__}: segments={segments!r} must be an integer from 1 to 1024"
                )
            cls.segments = segments
        if "[" in cls.name or "]" in cls.name:
            raise ConfigurationError(f"{cls.__qualname__}: a projection name cannot hold [ or ]")
        cls.__handlers__ = HandlerTable(cls)

    view: View

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "view":
            return _Detached(self.name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")

    def types(self) -> frozenset[str] | None:
        """The event type names this projection reads (None: every type)."""
        return self.__handlers__.type_names()

    async def apply(self, records: Iterable[RecordedEvent[Any]], view: View) -> None:
        """Apply a batch of records into `view` (called by the runner)."""
        self.view = view
        table = self.__handlers__
        try:
            for record in records:
                try:
                    found = table.resolve(record.event)
                    if found is None:
                        continue
                    handler, event = found
                    while True:
                        view.begin_event()
                        try:
                            if handler.takes_record:
                                outcome = handler.function(self, event, record)
                            else:
                                outcome = handler.function(self, event)
                            if handler.is_async:
                                await outcome
                            break
                        except DocumentNotLoaded as missing:
                            view.undo_event()
                            await view.load(missing.key)
                except StoreError:
                    raise  # loading a document failed: the store's trouble, which the runner
                    # retries; not a failure of the handler that stops the projection
                except Exception as exc:
                    raise ProjectionError(
                        self.name, record.position, record.type, f"{type(exc).__name__}: {exc}"
                    ) from exc
        finally:
            del self.view


class ReadModel:
    """The query side of a projection's documents, always from its live generation.

    A rebuild fills a new generation beside the live one and swaps it in one transaction,
    so a query sees either the old model or the new one, never a half-built one.
    """

    def __init__(self, store: EventStore, projection: type[Projection] | Projection | str) -> None:
        if not isinstance(store, StoreBase):
            raise ConfigurationError(f"{type(store).__name__} has no read model storage")
        self.store = store
        self.name = projection if isinstance(projection, str) else projection.name

    async def get(self, key: str, default: Any = None) -> Any:
        """The document under `key`, or `default`."""
        raw = await self.store.get_document(self.name, _check_key(key))
        return default if raw is None else json.loads(raw)

    async def items(self) -> AsyncIterator[tuple[str, Any]]:
        """Every `(key, document)`, by key."""
        async for key, raw in self.store.documents(self.name):
            yield key, json.loads(raw)

    async def all(self) -> dict[str, Any]:
        """Every document by key, in one dict (for small read models and tests)."""
        return {key: doc async for key, doc in self.items()}


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"read model keys are non-empty str, not {key!r}")
    return key
