"""Decision models: a decision made on exactly the events it depends on (DCB).

A `DecisionProjection` is a small fold over a few event types about a few tags (is this
user name taken? how many students has this course?). A `DecisionModel` composes several
into one decision: one read of the store with the union of their queries, each event fed to
every projection it concerns, and the `AppendCondition` that makes the append fail when any
of those facts changed in the meantime. `DecisionModel.decide` runs the whole loop (read,
decide, append on the condition) and decides again on a conflict, a bounded number of times.

```python
def name_taken(name: str) -> DecisionProjection[bool]:
    return DecisionProjection(False, {UserRegistered: lambda taken, e: True}, tags=[f"user:{name}"])

model = DecisionModel(taken=name_taken("alice"))

def register(state: DecisionState) -> list[Event]:
    if state.taken:
        raise NameTaken("alice")
    return [UserRegistered(name="alice")]

await model.decide(store, "user-alice", register)
```
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tidings.core.errors import AppendConditionFailed
from tidings.core.events import Event
from tidings.core.metadata import MetadataLike
from tidings.core.query import AppendCondition, Query, QueryItem
from tidings.core.recorded import RecordedEvent
from tidings.store.contracts import ANY, AppendResult, EventStore, ExpectedVersion

__all__ = ["Decision", "DecisionModel", "DecisionProjection", "DecisionState"]

S = TypeVar("S")

Decide = Callable[["DecisionState"], Sequence[Event] | Awaitable[Sequence[Event]]]
"""What a decision does with the state: the events to append (none: nothing to do), or a
domain error raised."""


@dataclass(frozen=True)
class DecisionProjection(Generic[S]):
    """One fact a decision needs: `initial` state, folded by `handlers` (one per event
    class: `(state, event) -> state`) over the events of those classes that carry every
    tag in `tags`."""

    initial: S
    handlers: Mapping[type[Event], Callable[[S, Any], S]]
    tags: Sequence[str] = ()
    _types: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.tags, str):
            raise TypeError(f"tags= takes a list of tags, not the single string {self.tags!r}")
        if not self.handlers:
            raise TypeError("a DecisionProjection needs a handler for at least one event class")
        names = set()
        for cls in self.handlers:
            if not (isinstance(cls, type) and issubclass(cls, Event) and cls.__event_type__):
                raise TypeError(f"handlers are keyed by Event classes with a type=, not {cls!r}")
            names.add(cls.__event_type__)
        object.__setattr__(self, "_types", frozenset(names))

    @property
    def query(self) -> Query:
        """The events this projection folds."""
        return Query(QueryItem(types=list(self.handlers), tags=list(self.tags)))

    def concerns(self, record: RecordedEvent[Any]) -> bool:
        """Whether `record` is one of this projection's events."""
        return record.type in self._types and all(tag in record.tags for tag in self.tags)

    def apply(self, state: S, record: RecordedEvent[Any]) -> S:
        """The state after `record` (its class's handler, or the nearest base class's)."""
        for cls in type(record.event).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                return handler(state, record.event)
        return state


class DecisionState(Mapping[str, Any]):
    """The folded state of each projection of a model, by name: `state.taken` or
    `state["taken"]`."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(
                f"no projection {name!r} in this decision (it has {', '.join(self._values)})"
            ) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Any:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"DecisionState({self._values!r})"


@dataclass(frozen=True)
class Decision:
    """What a model read: the `state`, the `condition` to append with, and how many events
    it folded (`seen`)."""

    state: DecisionState
    condition: AppendCondition
    seen: int


class DecisionModel:
    """Named `DecisionProjection`s read together: `DecisionModel(taken=..., seats=...)`."""

    def __init__(self, **projections: DecisionProjection[Any]) -> None:
        if not projections:
            raise TypeError("a DecisionModel needs at least one projection, by name")
        for name, projection in projections.items():
            if not isinstance(projection, DecisionProjection):
                raise TypeError(f"{name}= must be a DecisionProjection, not {projection!r}")
        self.projections = projections

    @property
    def query(self) -> Query:
        """The union of the projections' queries: what a decision reads and is conditioned on."""
        return Query(*(item for p in self.projections.values() for item in p.query.items))

    async def read(self, store: EventStore) -> Decision:
        """Fold the projections' events from `store` into their states, and the condition
        that fails when one of those events is appended after what was read."""
        query = self.query
        read = await store.read_query(query)
        states = {name: p.initial for name, p in self.projections.items()}
        for record in read.events:
            for name, projection in self.projections.items():
                if projection.concerns(record):
                    states[name] = projection.apply(states[name], record)
        seen, head = len(read.events), read.head
        return Decision(DecisionState(states), AppendCondition(query, after=head), seen)

    async def decide(
        self,
        store: EventStore,
        stream_id: str,
        decide: Decide,
        *,
        attempts: int = 3,
        expected_version: ExpectedVersion = ANY,
        metadata: MetadataLike | None = None,
    ) -> AppendResult | None:
        """Read, `decide`, append what it returns to `stream_id` on the decision's condition;
        on `AppendConditionFailed` read and decide again, up to `attempts` times in all (the
        last conflict is raised). None when `decide` returned no events."""
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        for attempt in range(1, attempts + 1):
            decision = await self.read(store)
            events = decide(decision.state)
            if inspect.isawaitable(events):
                events = await events
            events = list(_events(events))
            if not events:
                return None
            try:
                return await store.append(
                    stream_id,
                    events,
                    expected_version,
                    metadata,
                    condition=decision.condition,
                )
            except AppendConditionFailed:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")


def _events(found: Iterable[Event] | Event | None) -> Iterable[Event]:
    if found is None:
        return ()
    if isinstance(found, Event):
        return (found,)
    return found
