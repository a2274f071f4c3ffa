"""The store against a model: hypothesis drives random appends, retries and reads.

The model is a few lines of plain Python (a list of events per stream, one global log); every
backend must agree with it after every step.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import tidings
from tests.backends import STORE_BACKENDS, discard, require, store_url
from tests.events import Note
from tidings import ANY, NO_STREAM, STREAM_EXISTS, WrongExpectedVersion

STREAMS = ["a", "b", "c-'quoted'", "d/ü"]


def machine_for(backend: str) -> type[RuleBasedStateMachine]:
    class StoreModel(RuleBasedStateMachine):
        """Random appends, retries and reads, checked against a list-based model."""

        @initialize()
        def open(self) -> None:
            self.loop = asyncio.new_event_loop()
            self.tmp = tempfile.TemporaryDirectory()
            url = self.url = store_url(backend, Path(self.tmp.name))
            self.store: Any = self.run(tidings.open_store(url, batch_size=3).open())
            self.streams: dict[str, list[str]] = {}
            self.log: list[tuple[str, str]] = []
            self.last: tuple[str, list[Note], tidings.AppendResult] | None = None

        def run(self, coroutine: Any) -> Any:
            return self.loop.run_until_complete(coroutine)

        def teardown(self) -> None:
            if hasattr(self, "store"):
                self.run(self.store.aclose())
                self.loop.close()
                self.tmp.cleanup()
                discard(self.url)

        @rule(
            stream=st.sampled_from(STREAMS),
            texts=st.lists(st.text(max_size=5), min_size=1, max_size=3),
            expectation=st.sampled_from(["right", "stale", "ahead", "any", "none", "exists"]),
        )
        def append(self, stream: str, texts: list[str], expectation: str) -> None:
            actual = len(self.streams.get(stream, []))
            expected: Any = {
                "right": actual,
                "stale": max(actual - 1, 0),
                "ahead": actual + 1,
                "any": ANY,
                "none": NO_STREAM,
                "exists": STREAM_EXISTS,
            }[expectation]
            ok = (
                expected is ANY
                or (expected is STREAM_EXISTS and actual > 0)
                or (isinstance(expected, int) and expected == actual)
            )
            events = [Note(text=t) for t in texts]
            if not ok:
                with pytest.raises(WrongExpectedVersion) as info:
                    self.run(self.store.append(stream, events, expected_version=expected))
                assert info.value.actual == actual
                return
            result = self.run(self.store.append(stream, events, expected_version=expected))
            self.streams.setdefault(stream, []).extend(texts)
            self.log.extend((stream, t) for t in texts)
            assert (result.version, result.position) == (len(self.streams[stream]), len(self.log))
            self.last = (stream, events, result)

        @precondition(lambda self: self.last is not None)
        @rule(stale=st.booleans())
        def retry_last(self, stale: bool) -> None:
            assert self.last is not None
            stream, events, original = self.last
            expected = NO_STREAM if stale else ANY
            assert (
                self.run(self.store.append(stream, events, expected_version=expected)) == original
            )

        @rule(stream=st.sampled_from(STREAMS), start=st.integers(1, 6), backwards=st.booleans())
        def read_stream(self, stream: str, start: int, backwards: bool) -> None:
            async def read() -> list[Any]:
                return [r async for r in self.store.read_stream(stream, start, backwards=backwards)]

            got = [(r.version, r.event.text) for r in self.run(read())]
            model = list(enumerate(self.streams.get(stream, []), start=1))
            want = [m for m in model if m[0] <= start][::-1] if backwards else model[start - 1 :]
            assert got == want

        @rule(after=st.integers(0, 12))
        def read_all(self, after: int) -> None:
            async def read() -> list[Any]:
                return [r async for r in self.store.read_all(after=after)]

            got = [(r.position, r.stream_id, r.event.text) for r in self.run(read())]
            want = [(p, s, t) for p, (s, t) in enumerate(self.log, start=1)][after:]
            assert got == want

        @invariant()
        def versions_and_streams_agree(self) -> None:
            if not hasattr(self, "store"):
                return

            async def listing() -> list[Any]:
                return [s async for s in self.store.streams()]

            want = sorted((s, len(e)) for s, e in self.streams.items())
            assert [tuple(s) for s in self.run(listing())] == want
            assert self.run(self.store.last_position()) == len(self.log)

    return StoreModel


@pytest.mark.parametrize("backend", STORE_BACKENDS)
def test_store_agrees_with_the_model(backend: str) -> None:
    require(backend)
    machine = machine_for(backend)
    machine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
    machine.TestCase().runTest()
