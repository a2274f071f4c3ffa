"""Given / when / then tests for aggregates and command handlers, on the memory store.

```python
# an aggregate: no store at all
given(AccountOpened(owner="ann"), Deposited(amount=100), aggregate=Account).when(
    lambda account: account.withdraw(30)
).then(Withdrew(amount=30))

# command handlers: the given events are stored in a memory store first
await given({"account-acc-1": [AccountOpened(owner="ann")]}).when(
    Withdraw(account_id="acc-1", amount=500), handlers=[withdraw]
).raises(InsufficientFunds)
```

`then` compares the new events (type and data, in order) with the expected ones and fails
with both lists shown; `raises` checks the error and that nothing was stored. In a sync test
the scenario runs at once; in an async test, `await` it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from typing import Any

from tidings.app.aggregate import Aggregate
from tidings.app.commands import Command, CommandBus, declared_handler
from tidings.core.events import Event
from tidings.store.memory import MemoryEventStore

__all__ = ["Outcome", "Scenario", "given"]

Action = Command | Callable[[Any], Any]


def given(
    *events: Event | Iterable[Event] | Mapping[str, Iterable[Event]],
    aggregate: type[Aggregate] | None = None,
    id: str = "test",
    stream: str | None = None,
) -> Scenario:
    """Start a scenario from what already happened.

    Events may be given one by one, as a list, or as `{stream id: [events]}`. With
    `aggregate=`, they are the history of one instance (`id`) and `when` takes a function of
    it; otherwise they are stored (in `stream`, by default the aggregate's stream when known)
    and `when` takes a command.
    """
    streams: dict[str, list[Event]] = {}
    loose: list[Event] = []
    for item in events:
        if isinstance(item, Event):
            loose.append(item)
        elif isinstance(item, Mapping):
            for name, chunk in item.items():
                streams.setdefault(name, []).extend(chunk)
        else:
            loose.extend(item)
    if loose:
        name = stream or (f"{aggregate.__category__}-{id}" if aggregate else None)
        if name is None:
            raise TypeError("given(...) events need a stream: pass stream= or a {stream: events}")
        streams.setdefault(name, []).extend(loose)
    return Scenario(streams, aggregate, id)


class Scenario:
    """What happened before (`given`); `when` says what happens next."""

    def __init__(
        self, streams: dict[str, list[Event]], aggregate: type[Aggregate] | None, id: str
    ) -> None:
        self.streams = streams
        self.aggregate = aggregate
        self.id = id

    def when(self, action: Action, *, handlers: Iterable[object] = ()) -> When:
        """An aggregate method call (a function of the aggregate) or a command to dispatch to
        `handlers` (`@handles` functions, objects, or classes built with the store); without
        `handlers`, the `@handles` function most recently declared for the command's class."""
        return When(self, action, list(handlers))


class When:
    """A scenario with its action; finish it with `then` or `raises`."""

    def __init__(self, scenario: Scenario, action: Action, handlers: list[object]) -> None:
        self.scenario = scenario
        self.action = action
        self.handlers = handlers

    def then(self, *expected: Event) -> Outcome:
        """Expect exactly these new events, in order (none when called with nothing)."""
        return Outcome(self, list(expected), None, None)

    def raises(self, error: type[BaseException], match: str | None = None) -> Outcome:
        """Expect `error` (and `match`, a regex, in its message), with nothing stored."""
        return Outcome(self, [], error, match)

    async def run(self) -> tuple[list[Event], BaseException | None]:
        """Run the action: the new events and the error raised, if any."""
        scenario = self.scenario
        if scenario.aggregate is not None and not isinstance(self.action, Command):
            instance = scenario.aggregate(scenario.id)
            for events in scenario.streams.values():
                for event in events:
                    instance._apply(event, None)
            try:
                outcome = self.action(instance)
                if isinstance(outcome, Awaitable):
                    await outcome
            except Exception as exc:
                return [], exc
            return list(instance.pending_events), None
        if not isinstance(self.action, Command):
            raise TypeError("when() takes a command unless given(...) names an aggregate=")
        async with MemoryEventStore() as store:
            for name, events in scenario.streams.items():
                await store.append(name, events)
            before = await store.last_position()
            handlers = [_build(h, store) for h in self.handlers]
            if not handlers:
                latest = declared_handler(type(self.action))
                if latest is None:
                    raise TypeError(
                        f"no @handles function is declared for {type(self.action).__name__}; "
                        "pass when(command, handlers=[...])"
                    )
                handlers = [latest]
            bus = CommandBus(store, *handlers)
            error: BaseException | None = None
            try:
                await bus.dispatch(self.action)
            except Exception as exc:
                error = exc
            new = [record.event async for record in store.read_all(after=before)]
        return new, error


class Outcome:
    """A finished scenario: checked at once in sync code, or when awaited in async code."""

    def __init__(
        self,
        when: When,
        expected: list[Event],
        error: type[BaseException] | None,
        match: str | None,
    ) -> None:
        self.when = when
        self.expected = expected
        self.error = error
        self.match = match
        self.events: list[Event] = []
        self.raised: BaseException | None = None
        self._checked = False
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self.check())  # a sync test: run now

    async def check(self) -> Outcome:
        """Run the scenario and assert on it."""
        if self._checked:
            return self
        self._checked = True
        self.events, self.raised = await self.when.run()
        if self.error is not None:
            if not isinstance(self.raised, self.error):
                got = "nothing" if self.raised is None else repr(self.raised)
                raise AssertionError(f"expected {self.error.__name__} to be raised, got {got}")
            if self.match is not None and not re.search(self.match, str(self.raised)):
                raise AssertionError(f"{self.raised!r} does not match {self.match!r}")
            if self.events:
                raise AssertionError(
                    f"expected nothing stored on an error, got {_show(self.events)}"
                )
            return self
        if self.raised is not None:
            raise AssertionError(f"expected events, but it raised {self.raised!r}") from self.raised
        if self.events != self.expected:
            expected, got = _show(self.expected), _show(self.events)
            raise AssertionError(f"events differ\n  expected: {expected}\n  got:      {got}")
        return self

    def __await__(self) -> Generator[Any, None, Outcome]:
        return self.check().__await__()

    def __del__(self) -> None:
        if not self._checked:
            raise RuntimeError("a given/when/then scenario in async code was never awaited")


def _build(handler: object, store: MemoryEventStore) -> object:
    if isinstance(handler, type):
        return handler(store)
    return handler


def _show(events: list[Event]) -> str:
    return "[" + ", ".join(f"{type(e).__name__}({e.model_dump()})" for e in events) + "]"
