"""Concurrency: many writers on few streams, on SQLite and PostgreSQL, in one process and in
several.

Two scenarios per store:

- A hypothesis state machine whose every step is a burst of concurrent appends (asyncio tasks
  in this process and writer processes of their own, all on the same store) to three streams,
  with every kind of expected version, multi-event appends, concurrent copies of one append,
  and retries of earlier appends. Which of two racing writers wins is up to the store, so the
  model does not predict outcomes: it checks that each outcome is one the contract allows.
  After every step: each stream's versions run 1..n with no gap; every acknowledged append is
  stored once, at consecutive versions, where its result said; a refused append left nothing;
  `WrongExpectedVersion` names the stream, the expected version as passed, and an actual
  version the stream really had during the burst (one that clashes); when every writer of a
  stream expected its current version, exactly one won; a retry of a stored append returns
  its original result, whatever it expects; `read_all` positions strictly increase; and a live
  `subscribe` (started before the first append) and a reader polling `read_all(after=p)` on a
  second store object have each seen every position once, in order.
- A load: writer tasks and writer processes append a fixed count each with the optimistic
  loop (read the version, append expecting it, retry on a clash), with `ANY` and
  `STREAM_EXISTS` appends and idempotent retries mixed in; then the same invariants.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import tidings
from tests.backends import discard, require, store_url
from tests.events import Note
from tests.reliability.harness import Row, reliability, report, scale, stopwatch
from tidings import ANY, NO_STREAM, STREAM_EXISTS, TidingsError, WrongExpectedVersion

pytestmark = [reliability, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = {"sqlite": "SQLite (WAL file)", "postgres": "PostgreSQL"}
STREAMS = ["alpha", "beta", "gamma"]
STALLED = 5.0  # seconds a follower behind the head of the log may go without moving on

# -- what an append attempt is, in this process or a writer process -------------------------

Expected = int | str  # an int, or "ANY" / "STREAM_EXISTS", as it travels between processes


def encode_expected(expected: Any) -> Expected:
    return expected if isinstance(expected, int) else expected.name


def decode_expected(expected: Expected) -> Any:
    return (
        expected
        if isinstance(expected, int)
        else {"ANY": ANY, "STREAM_EXISTS": STREAM_EXISTS}[expected]
    )


def matches(expected: Expected, actual: int) -> bool:
    """Whether a stream at `actual` satisfies `expected` (the rule the store must apply)."""
    if expected == "ANY":
        return True
    if expected == "STREAM_EXISTS":
        return actual > 0
    return expected == actual


async def attempt(
    store: Any, stream: str, events: list[tuple[str, str]], expected: Expected
) -> dict[str, Any]:
    """Append `events` ((id, text) pairs) and describe the outcome as JSON."""
    notes = [Note(text=text).with_id(uuid.UUID(hex=event_id)) for event_id, text in events]
    try:
        result = await store.append(stream, notes, expected_version=decode_expected(expected))
    except WrongExpectedVersion as exc:
        return {
            "wrong": {
                "stream": exc.stream_id,
                "expected": encode_expected(exc.expected),
                "actual": exc.actual,
            }
        }
    except TidingsError as exc:  # anything else is a finding: the checks report it
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"version": result.version, "position": result.position}


# -- the load's writer, the same in this process and in the writer processes -----------------


async def load_writer(store: Any, name: str, count: int, seed: int) -> dict[str, Any]:
    """`count` appends: mostly optimistic (read the version, expect it, retry on a clash),
    some `ANY`, some `STREAM_EXISTS`; one in ten is sent again at once, which must be a no-op
    returning the same result. Returns every acknowledged append and what went wrong."""
    rnd = random.Random(seed)
    acks: list[dict[str, Any]] = []
    problems: list[str] = []
    conflicts = retries = 0
    for i in range(count):
        stream = rnd.choice(STREAMS)
        events = [(uuid.uuid4().hex, f"{name}-{i}-{k}") for k in range(rnd.choice([1, 1, 2, 3]))]
        mode = rnd.random()
        while True:
            if mode < 0.7:
                expected: Expected = await store.stream_version(stream)
            else:
                expected = "ANY" if mode < 0.85 else "STREAM_EXISTS"
            outcome = await attempt(store, stream, events, expected)
            if "wrong" not in outcome:
                break
            conflicts += 1
            mode = 0.0  # after a clash, the optimistic loop: read the version, expect it
            wrong = outcome["wrong"]
            if (wrong["stream"], wrong["expected"]) != (stream, expected) or matches(
                expected, wrong["actual"]
            ):
                problems.append(f"{name}: {expected!r} on {stream!r} refused with {wrong}")
            elif isinstance(expected, int) and wrong["actual"] <= expected:
                problems.append(f"{name}: told {stream!r} is at {wrong['actual']} < {expected}")
        if "error" in outcome:
            problems.append(f"{name}: {outcome['error']}")
            continue
        if isinstance(expected, int) and outcome["version"] != expected + len(events):
            problems.append(f"{name}: expected {expected}, {len(events)} events, got {outcome}")
        if rnd.random() < 0.1:  # the same events again, with a stale expectation or ANY
            retries += 1
            again = await attempt(store, stream, events, rnd.choice([0, "ANY", "STREAM_EXISTS"]))
            if again != outcome:
                problems.append(f"{name}: a retry of {outcome} returned {again}")
        acks.append({"stream": stream, "ids": [e[0] for e in events], **outcome})
    return {"acks": acks, "problems": problems, "conflicts": conflicts, "retries": retries}


# -- writer processes -----------------------------------------------------------------------


def child() -> None:
    """A writer process: one JSON command per line on stdin, one JSON answer per line out.

    {"op": "open", "url": U} | {"op": "append", "calls": [...]} | {"op": "load", ...} |
    {"op": "close"}; end of input ends it.
    """
    asyncio.run(_child())


async def _child() -> None:
    loop = asyncio.get_running_loop()
    store: Any = None
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            op = command["op"]
            if store is not None and op == "open":  # the last example ended abruptly
                await store.aclose()
            if op == "open":
                store = await tidings.open_store(command["url"]).open()
                answer: Any = {"ok": True}
            elif op == "append":
                answer = await asyncio.gather(
                    *(
                        attempt(store, c["stream"], c["events"], c["expected"])
                        for c in command["calls"]
                    )
                )
            elif op == "load":
                answer = await asyncio.gather(
                    *(
                        load_writer(store, f"{command['name']}.{t}", command["count"], seed)
                        for t, seed in enumerate(command["seeds"])
                    )
                )
            else:  # close
                await store.aclose()
                store = None
                answer = {"ok": True}
            sys.stdout.write(json.dumps({"seq": command["seq"], "answer": answer}) + "\n")
            sys.stdout.flush()
    finally:
        if store is not None:
            await store.aclose()


class Child:
    """A writer process of this test, driven line by line.

    Commands are numbered: `receive` returns the answer to the last one sent, passing over
    any answer an interrupted step left unread.
    """

    def __init__(self) -> None:
        self.seq = 0
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (its stderr, open while it runs)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from tests.reliability.test_concurrency import child; child()",
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.seq += 1
        self.process.stdin.write(json.dumps({**command, "seq": self.seq}) + "\n")
        self.process.stdin.flush()

    def receive(self) -> Any:
        assert self.process.stdout is not None
        while line := self.process.stdout.readline():
            message = json.loads(line)
            if message["seq"] == self.seq:
                return message["answer"]
        self.process.wait(10)
        self.log.seek(0)
        output = self.log.read().decode(errors="replace")
        raise RuntimeError(f"writer process {self.process.pid} died: {output[-2000:]}")

    def call(self, command: dict[str, Any]) -> Any:
        self.send(command)
        return self.receive()

    def stop(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.log.close()


@contextmanager
def children(count: int) -> Iterator[list[Child]]:
    started = [Child() for _ in range(count)]
    try:
        yield started
    finally:
        for one in started:
            one.stop()


# -- followers: a live subscription and a polling reader -----------------------------------


@dataclass
class Followers:
    """A `subscribe` on the main store and a `read_all(after=p)` poller on a second store
    object, both started before the first append and running until the end."""

    store: Any
    reader: Any
    subscribed: list[tuple[int, str]] = field(default_factory=list)
    polled: list[tuple[int, str]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._subscribe()), asyncio.create_task(self._poll())]

    async def _subscribe(self) -> None:
        async for record in self.store.subscribe():
            self.subscribed.append((record.position, record.id.hex))

    async def _poll(self) -> None:
        after = 0
        while True:
            async for record in self.reader.read_all(after=after):
                self.polled.append((record.position, record.id.hex))
                after = record.position
            await asyncio.sleep(0.01)

    async def caught_up(self, log: list[tuple[int, str]]) -> list[str]:
        """Wait (bounded) until both followers reach the end of `log`; what differs."""
        head = log[-1][0] if log else 0
        problems = [
            f"a follower stopped: {task.exception() if not task.cancelled() else 'cancelled'}"
            for task in self.tasks
            if task.done()
        ]
        progress, moved = -1, time.monotonic()
        while time.monotonic() - moved < STALLED:
            reached = [seen[-1][0] if seen else 0 for seen in (self.subscribed, self.polled)]
            if min(reached) >= head:
                break
            if sum(reached) != progress:
                progress, moved = sum(reached), time.monotonic()
            await asyncio.sleep(0.005)
        for name, seen in (("subscribe", self.subscribed), ("read_all poller", self.polled)):
            positions = [p for p, _ in seen]
            if any(b <= a for a, b in itertools.pairwise(positions)):
                problems.append(f"{name} saw positions out of order or twice")
            if seen != log:
                missing = set(log) - set(seen)
                extra = Counter(seen) - Counter(log)
                problems.append(
                    f"{name} saw {len(seen)} events, the log holds {len(log)}: "
                    f"{len(missing)} missing {sorted(missing)[:3]}, {sum(extra.values())} extra"
                )
        return problems

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# -- reading the store back -----------------------------------------------------------------


@dataclass
class Stored:
    """The whole log, read back once."""

    log: list[tuple[int, str]]  # (position, id) in read_all order
    at: dict[str, tuple[str, int, int]]  # id: (stream, version, position)
    copies: Counter[str]  # id: times stored
    versions: dict[str, list[int]]  # stream: its versions, in log order

    @classmethod
    async def read(cls, store: Any) -> Stored:
        log = []
        at = {}
        copies: Counter[str] = Counter()
        versions: dict[str, list[int]] = {}
        async for record in store.read_all():
            key = record.id.hex
            log.append((record.position, key))
            at[key] = (record.stream_id, record.version, record.position)
            copies[key] += 1
            versions.setdefault(record.stream_id, []).append(record.version)
        return cls(log, at, copies, versions)

    def problems(self) -> list[str]:
        found = []
        positions = [p for p, _ in self.log]
        if any(b <= a for a, b in itertools.pairwise(positions)):
            found.append("read_all positions are not strictly increasing")
        for stream, versions in self.versions.items():
            if versions != list(range(1, len(versions) + 1)):
                found.append(f"{stream!r} has versions {versions[:20]}... (a gap or a repeat)")
        return found

    def gaps(self) -> int:
        """Positions skipped in the log (PostgreSQL may burn some; none are expected here)."""
        return (self.log[-1][0] - len(self.log)) if self.log else 0


def check_acks(acks: list[dict[str, Any]], stored: Stored) -> tuple[int, int, list[str]]:
    """(lost, duplicated, problems) of acknowledged appends against what is stored."""
    lost = duplicated = 0
    problems = []
    for ack in acks:
        ids = ack["ids"]
        first = ack["version"] - len(ids) + 1
        for k, event_id in enumerate(ids):
            if event_id not in stored.at:
                lost += 1
                continue
            stream, version, _ = stored.at[event_id]
            if (stream, version) != (ack["stream"], first + k):
                problems.append(f"{event_id} acknowledged at {ack} is stored at {stream}@{version}")
        last = stored.at.get(ids[-1])
        if last is not None and last[2] != ack["position"]:
            problems.append(f"{ack} acknowledged, its last event is at position {last[2]}")
        positions = [stored.at[i][2] for i in ids if i in stored.at]
        if positions != sorted(set(positions)):
            problems.append(f"{ack}: its events' positions are not increasing: {positions}")
    duplicated = sum(n - 1 for n in stored.copies.values())
    claimed = Counter(
        (ack["stream"], ack["version"] - len(ack["ids"]) + 1 + k)
        for ack in {tuple(a["ids"]): a for a in acks}.values()
        for k in range(len(ack["ids"]))
    )
    merged = sum(n - 1 for n in claimed.values())  # two acknowledged appends, one version
    return lost, duplicated + merged, problems


# -- the state machine ----------------------------------------------------------------------


@dataclass
class Append:
    """One logical append: fixed events, sent once or more, maybe acknowledged."""

    stream: str
    events: list[tuple[str, str]]
    result: dict[str, Any] | None = None  # {"version", "position"} once acknowledged


@dataclass
class Totals:
    """Counted over every example hypothesis ran, for the report row."""

    examples: int = 0
    steps: int = 0
    sends: int = 0
    acked_appends: int = 0
    acked_events: int = 0
    conflicts: int = 0
    idempotent: int = 0
    read_back: int = 0
    by_process: int = 0
    lost: int = 0
    duplicated: int = 0


LABELS = ["current", "previous", "next", "any", "no_stream", "exists"]


def resolve(label: str, version: int) -> Expected:
    """An expected version for a stream at `version`, by its label."""
    return {
        "current": version,
        "previous": max(version - 1, 0),
        "next": version + 1,
        "any": "ANY",
        "no_stream": NO_STREAM,
        "exists": "STREAM_EXISTS",
    }[label]


# one new append: (stream, expectation, events, copies, where each copy runs: -1 this process)
new_appends = st.tuples(
    st.sampled_from(STREAMS),
    st.sampled_from(LABELS),
    st.integers(1, 3),
    st.integers(1, 2),
    st.lists(st.integers(-1, 1), min_size=2, max_size=2),
)
# a retry of an earlier append: (which, expectation, copies, where)
retries = st.tuples(
    st.integers(0, 10_000),
    st.sampled_from(LABELS),
    st.integers(1, 2),
    st.lists(st.integers(-1, 1), min_size=2, max_size=2),
)


def machine_for(backend: str, writers: list[Child], totals: Totals) -> type[RuleBasedStateMachine]:
    class ConcurrentAppends(RuleBasedStateMachine):
        """Bursts of concurrent appends, checked against what the contract allows."""

        @initialize()
        def open(self) -> None:
            totals.examples += 1
            self.runner = asyncio.Runner()
            self.tmp = tempfile.TemporaryDirectory()
            self.url = store_url(backend, Path(self.tmp.name))
            self.store: Any = self.run(tidings.open_store(self.url).open())
            self.reader: Any = self.run(tidings.open_store(self.url).open())
            for writer in writers:
                assert writer.call({"op": "open", "url": self.url}) == {"ok": True}
            self.followers = Followers(self.store, self.reader)
            self.run(self._start_followers())
            self.history: list[Append] = []
            self.versions = dict.fromkeys(STREAMS, 0)
            self.problems: list[str] = []
            self.followers_failed = False
            self.step = 0

        async def _start_followers(self) -> None:
            self.followers.start()
            await asyncio.sleep(0)  # subscribed before the first append

        def run(self, coroutine: Any) -> Any:
            return self.runner.run(coroutine)

        def teardown(self) -> None:
            # Violations are recorded as they are found, after every step, and raised only
            # here: which racing writer wins differs from run to run, and a failure raised
            # mid-run would stop hypothesis' replay at a different step each time, which it
            # reports as a flaky strategy instead of shrinking the example.
            if not hasattr(self, "runner"):
                return
            try:
                stored = self.run(Stored.read(self.store))
                totals.read_back += len(stored.at)
                lost, duplicated, _ = check_acks(self.acks(), stored)
                totals.lost += lost
                totals.duplicated += duplicated + len(self.refused() & set(stored.at))
                for writer in writers:
                    writer.call({"op": "close"})
                self.run(self.followers.stop())
                self.run(self.reader.aclose())
                self.run(self.store.aclose())
            finally:
                self.runner.close()
                self.tmp.cleanup()
                discard(self.url)
            if sys.exc_info()[1] is None:  # not while hypothesis stops a run on its own
                assert not self.problems, "\n".join(self.problems[:20])

        # -- rules ------------------------------------------------------------------------

        @rule(appends=st.lists(new_appends, min_size=1, max_size=8))
        def burst(self, appends: list[Any]) -> None:
            self.execute(self.fresh(appends))

        @precondition(lambda self: bool(self.history))
        @rule(
            picks=st.lists(retries, min_size=1, max_size=4),
            fresh=st.lists(new_appends, max_size=3),
        )
        def retry(self, picks: list[Any], fresh: list[Any]) -> None:
            sends = []
            for which, label, copies, where in picks:
                append = self.history[which % len(self.history)]
                if any(s[0] is append for s in sends):
                    continue  # one expectation per append per burst
                expected = resolve(label, self.versions[append.stream])
                sends += [(append, expected, where[c]) for c in range(copies)]
            self.execute(sends + self.fresh(fresh))

        def fresh(self, appends: list[Any]) -> list[Any]:
            """New appends (with new event ids) into the history, each sent `copies` times."""
            sends = []
            for stream, label, count, copies, where in appends:
                events = [(uuid.uuid4().hex, f"{len(self.history)}.{k}") for k in range(count)]
                self.history.append(Append(stream, events))
                expected = resolve(label, self.versions[stream])
                sends += [(self.history[-1], expected, where[c]) for c in range(copies)]
            return sends

        # -- one burst and what it must have done -----------------------------------------

        def execute(self, sends: list[tuple[Append, Expected, int]]) -> None:
            self.step += 1
            totals.steps += 1
            totals.sends += len(sends)
            before = dict(self.versions)
            known = {id(a) for a, _, _ in sends if a.result is not None}
            remote: dict[int, list[int]] = {}
            for index, (_, _, where) in enumerate(sends):
                if where >= 0:
                    remote.setdefault(where % len(writers), []).append(index)
            for number, indexes in remote.items():
                calls = [
                    {"stream": sends[i][0].stream, "events": sends[i][0].events,
                     "expected": sends[i][1]}
                    for i in indexes
                ]  # fmt: skip
                writers[number].send({"op": "append", "calls": calls})
                totals.by_process += len(calls)

            async def burst() -> list[Any]:
                loop = asyncio.get_running_loop()
                local = [
                    attempt(self.store, append.stream, append.events, expected)
                    for append, expected, where in sends
                    if where < 0
                ]
                answers = [loop.run_in_executor(None, writers[n].receive) for n in remote]
                return await asyncio.gather(*local, *answers)

            results = self.run(burst())
            outcomes: list[dict[str, Any]] = [{}] * len(sends)
            local_indexes = [i for i, (_, _, where) in enumerate(sends) if where < 0]
            for i, outcome in zip(local_indexes, results[: len(local_indexes)], strict=True):
                outcomes[i] = outcome
            for indexes, answer in zip(remote.values(), results[len(local_indexes) :], strict=True):
                for i, outcome in zip(indexes, answer, strict=True):
                    outcomes[i] = outcome

            stored = self.run(Stored.read(self.store))
            after = {s: len(stored.versions.get(s, [])) for s in STREAMS}
            problems: list[str] = []
            fresh: dict[int, Append] = {}  # acknowledged in this burst for the first time
            for (append, expected, _), outcome in zip(sends, outcomes, strict=True):
                stream = append.stream
                if "error" in outcome:
                    problems.append(f"append to {stream!r} failed: {outcome['error']}")
                elif "wrong" in outcome:
                    totals.conflicts += 1
                    wrong = outcome["wrong"]
                    if id(append) in known:
                        problems.append(f"a retry of stored {append.result} was refused: {wrong}")
                    if (wrong["stream"], wrong["expected"]) != (stream, expected):
                        problems.append(f"{expected!r} on {stream!r}: refusal names {wrong}")
                    if matches(expected, wrong["actual"]):
                        problems.append(f"{expected!r} refused, yet the actual matched: {wrong}")
                    if not before[stream] <= wrong["actual"] <= after[stream]:
                        problems.append(
                            f"{stream!r} went {before[stream]} to {after[stream]}, a refusal "
                            f"says it was at {wrong['actual']}"
                        )
                else:
                    totals.idempotent += id(append) in known or id(append) in fresh
                    if append.result is None:
                        append.result = outcome
                        fresh[id(append)] = append
                        count = len(append.events)
                        if not (matches(expected, outcome["version"] - count)):
                            problems.append(
                                f"{count} events expecting {expected!r} on {stream!r} "
                                f"acknowledged at version {outcome['version']}"
                            )
                    elif outcome != append.result:
                        problems.append(
                            f"one append acknowledged as {append.result} and as {outcome}"
                        )

            # The stream grew by exactly the appends acknowledged for the first time.
            for stream in STREAMS:
                grown = sum(len(a.events) for a in fresh.values() if a.stream == stream)
                if after[stream] != before[stream] + grown:
                    problems.append(
                        f"{stream!r} went {before[stream]} to {after[stream]}; the appends "
                        f"acknowledged in this burst add {grown}"
                    )
                contenders = [(a, e) for a, e, _ in sends if a.stream == stream]
                if (
                    contenders
                    and all(a.result is None or id(a) in fresh for a, _ in contenders)
                    and all(e == before[stream] for _, e in contenders)
                ):
                    winners = {id(a) for a, _ in contenders if id(a) in fresh}
                    if len(winners) != 1:
                        problems.append(
                            f"{len({id(a) for a, _ in contenders})} appends expected "
                            f"{stream!r} at {before[stream]}: {len(winners)} won"
                        )
            totals.acked_appends += len(fresh)
            totals.acked_events += sum(len(a.events) for a in fresh.values())
            self.versions = after
            self.note(problems)

        def acks(self) -> list[dict[str, Any]]:
            return [
                {"stream": a.stream, "ids": [e[0] for e in a.events], **a.result}
                for a in self.history
                if a.result is not None
            ]

        def refused(self) -> set[str]:
            return {e[0] for a in self.history if a.result is None for e in a.events}

        def note(self, problems: list[str]) -> None:
            self.problems += [f"step {self.step}: {problem}" for problem in problems]

        @invariant()
        def every_acknowledged_append_stored_once_and_nothing_else(self) -> None:
            if not hasattr(self, "runner"):
                return
            stored = self.run(Stored.read(self.store))
            acks = self.acks()
            lost, duplicated, problems = check_acks(acks, stored)
            problems += stored.problems()
            if lost or duplicated:
                problems.append(f"{lost} acknowledged events lost, {duplicated} stored twice")
            left = self.refused() & set(stored.at)
            if left:
                problems.append(f"{len(left)} events of refused appends are stored")
            if len(stored.at) != sum(len(a["ids"]) for a in acks):
                problems.append(f"{len(stored.at)} events stored, {len(acks)} appends acked")
            head = stored.log[-1][0] if stored.log else 0
            if self.run(self.store.last_position()) != head:
                problems.append(f"last_position() is not {head}, the last position read")
            if self.run(_listing(self.store)) != {s: v for s, v in self.versions.items() if v}:
                problems.append(f"streams() does not list versions {self.versions}")
            self.note(problems)

        @invariant()
        def followers_saw_every_event_once_in_order(self) -> None:
            if not hasattr(self, "runner"):
                return
            if self.followers_failed:
                return  # found already; a follower that missed an event may wait at each step
            log = self.run(Stored.read(self.store)).log
            problems = self.run(self.followers.caught_up(log))
            self.followers_failed = bool(problems)
            self.note(problems)

    return ConcurrentAppends


async def _listing(store: Any) -> dict[str, int]:
    return {s.stream_id: s.version async for s in store.streams()}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_concurrent_appends_against_the_contract(backend: str) -> None:
    require(backend)
    totals = Totals()
    examples, steps = scale(10, 150), scale(12, 40)
    with stopwatch() as took, children(2) as writers:
        machine = machine_for(backend, writers, totals)
        machine.TestCase.settings = settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        failure: BaseException | None = None
        try:
            machine.TestCase().runTest()
        except BaseException as exc:  # still report what was seen, then fail with it
            failure = exc
    report(
        Row(
            scenario="Concurrent appends, hypothesis state machine",
            backend=BACKENDS[backend],
            load=(
                f"{totals.examples} examples x up to {steps} bursts; {totals.sends} appends "
                f"sent ({totals.by_process} from 2 writer processes), 3 streams"
            ),
            faults="racing writers, every expected-version kind, concurrent copies, retries",
            events_in=totals.acked_events,
            events_out=totals.read_back,
            lost=totals.lost,
            duplicated=totals.duplicated,
            notes=(
                f"{totals.acked_appends} appends acknowledged, {totals.conflicts} "
                f"WrongExpectedVersion, {totals.idempotent} idempotent returns; every step "
                "checked: versions gap-free, refusals left nothing, subscriber and poller "
                "complete and in order" + (f"; FAILED: {type(failure).__name__}" if failure else "")
            ),
            seconds=round(took[0], 1),
        )
    )
    if failure is not None:
        raise failure


# -- the load -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_many_writers_on_few_streams(backend: str, tmp_path: Path) -> None:
    require(backend)
    tasks, processes, per_process = scale(8, 32), scale(2, 4), 2
    count = scale(40, 300)
    url = store_url(backend, tmp_path)
    try:
        with stopwatch() as took, children(processes) as writers:
            outcome = asyncio.run(_load(url, writers, tasks, per_process, count))
    finally:
        discard(url)
    acks, problems, conflicts, retries, stored, follower_problems = outcome
    lost, duplicated, found = check_acks(acks, stored)
    problems += found + stored.problems() + follower_problems
    acked_events = sum(len(a["ids"]) for a in acks)
    if len(stored.at) != acked_events:
        problems.append(f"{len(stored.at)} events stored, {acked_events} acknowledged")
    writers_total = tasks + processes * per_process
    report(
        Row(
            scenario="Many writers on few streams",
            backend=BACKENDS[backend],
            load=(
                f"{writers_total} writers ({tasks} tasks + {processes} processes x "
                f"{per_process} tasks) x {count} appends of 1-3 events, 3 streams"
            ),
            faults=f"racing writers: {conflicts} expected-version conflicts, retried",
            events_in=acked_events,
            events_out=len(stored.at),
            lost=lost,
            duplicated=duplicated,
            notes=(
                f"{len(acks)} appends acknowledged, {conflicts} WrongExpectedVersion "
                f"(each retried with a fresh version), {retries} idempotent retries; "
                f"{stored.gaps()} position gaps; versions gap-free, subscriber complete"
            ),
            seconds=round(took[0], 1),
        )
    )
    assert not problems, problems[:20]


async def _load(
    url: str, writers: list[Child], tasks: int, per_process: int, count: int
) -> tuple[list[dict[str, Any]], list[str], int, int, Stored, list[str]]:
    loop = asyncio.get_running_loop()
    async with tidings.open_store(url) as store, tidings.open_store(url) as reader:
        followers = Followers(store, reader)
        followers.start()
        await asyncio.sleep(0)
        for n, writer in enumerate(writers):
            await loop.run_in_executor(None, writer.call, {"op": "open", "url": url})
            writer.send(
                {
                    "op": "load",
                    "name": f"p{n}",
                    "count": count,
                    "seeds": [1000 * n + t for t in range(per_process)],
                }
            )
        results = await asyncio.gather(
            *(load_writer(store, f"t{t}", count, t) for t in range(tasks)),
            *(loop.run_in_executor(None, writer.receive) for writer in writers),
        )
        logs = results[:tasks] + [log for answer in results[tasks:] for log in answer]
        for writer in writers:
            await loop.run_in_executor(None, writer.call, {"op": "close"})
        stored = await Stored.read(store)
        follower_problems = await followers.caught_up(stored.log)
        await followers.stop()
    acks = [ack for log in logs for ack in log["acks"]]
    problems = [p for log in logs for p in log["problems"]]
    conflicts = sum(log["conflicts"] for log in logs)
    retries = sum(log["retries"] for log in logs)
    return acks, problems, conflicts, retries, stored, follower_problems
