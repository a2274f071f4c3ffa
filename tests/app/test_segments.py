"""Projections split into segments: a stable hash of the stream id, a checkpoint and a lease
per segment, runners dividing segments fairly, a dead worker's segments taken over, and
segment counts changed only by a rebuild; on every store."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import tidings
from tests.app.test_worker_takeover import Worker
from tests.backends import discard, require, store_url
from tests.events import Deposited
from tidings import ConfigurationError, Projection, ProjectionRunner, ReadModel, RecordedEvent, on
from tidings.app.segments import segment_of


class Balances(Projection, name="seg_balances", segments=4):
    """One document per stream: its balance and the last version applied (a version applied
    twice or skipped raises, so a test sees any double or lost event)."""

    @on(Deposited)
    def deposited(self, event: Deposited, record: RecordedEvent[Any]) -> None:
        doc = self.view.get(record.stream_id, {"version": 0, "balance": 0})
        if record.version != doc["version"] + 1:
            raise RuntimeError(f"{record.stream_id}: version {record.version} after {doc}")
        self.view.put(
            record.stream_id, {"version": record.version, "balance": doc["balance"] + event.amount}
        )


class Unsegmented(Balances, name="seg_balances", segments=1):
    pass


class Doubled(Balances, name="seg_balances", segments=2):
    pass


@pytest.fixture(params=["sqlite", "postgres"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    require(request.param)
    url = store_url(request.param, tmp_path)
    yield url
    discard(url)


async def fill(store: tidings.EventStore, streams: int = 12, each: int = 5) -> None:
    for n in range(each):
        for s in range(streams):
            await store.append(f"acct-{s}", [Deposited(amount=n + 1)])


def test_the_segment_of_a_stream_is_the_documented_hash() -> None:
    for stream in ["acct-1", "order/ü", "x" * 300]:
        digest = hashlib.blake2b(stream.encode(), digest_size=8).digest()
        assert segment_of(stream, 4) == int.from_bytes(digest, "big") % 4
    assert segment_of("acct-1", 1) == 0
    spread = Counter(segment_of(f"s-{n}", 4) for n in range(4000))
    assert set(spread) == {0, 1, 2, 3} and min(spread.values()) > 800


def test_segments_are_checked_when_the_class_is_defined() -> None:
    with pytest.raises(ConfigurationError, match="segments=0"):

        class Bad(Projection, segments=0):
            pass


async def test_a_segmented_projection_builds_the_same_read_model(store: tidings.EventStore) -> None:
    await fill(store)
    async with ProjectionRunner(store, Balances()) as runner:
        await runner.wait_for(await store.last_position())
        rows = await runner.status()
    segmented = await ReadModel(store, "seg_balances").all()
    assert len(segmented) == 12 and all(doc["version"] == 5 for doc in segmented.values())
    assert [(r.name, r.segment, r.segments) for r in rows] == [
        ("seg_balances", k, 4) for k in range(4)
    ]
    assert all(r.owner == runner.owner and r.lag_events == 0 for r in rows)
    states = {s.name: s for s in await store.projection_states()}
    assert {f"seg_balances[{k}/4]" for k in range(4)} <= set(states)
    listed = await tidings.projection_status(store)  # no classes: one row per segment
    assert [(r.name, r.segment) for r in listed] == [("seg_balances", k) for k in range(4)]


async def test_wait_for_waits_for_every_segment(store: tidings.EventStore) -> None:
    runner = ProjectionRunner(store, Balances())
    await fill(store, streams=8, each=2)
    await runner.wait_for(await store.last_position())  # not started: runs every segment
    positions = {s.name: s.position for s in await store.projection_states()}
    head = await store.last_position()
    assert all(positions[f"seg_balances[{k}/4]"] == head for k in range(4))


async def test_runners_divide_segments_fairly_and_take_over(shared_url: str) -> None:
    store_url = shared_url
    lease = 0.6
    async with tidings.open_store(store_url) as a_store, tidings.open_store(store_url) as b_store:
        await fill(a_store)
        a = ProjectionRunner(a_store, Balances(), lease=lease, owner="a")
        b = ProjectionRunner(b_store, Balances(), lease=lease, owner="b")
        await a.start()
        await b.start()
        try:

            async def shares(*runners: ProjectionRunner, within: float) -> list[int]:
                deadline = time.monotonic() + within
                while True:
                    held = [sum(r.leases().values()) for r in runners]
                    if (
                        sorted(held) == sorted(_fair(4, len(runners)))
                        or time.monotonic() > deadline
                    ):
                        return held
                    await asyncio.sleep(0.05)

            assert sorted(await shares(a, b, within=6 * lease)) == [2, 2]
            async with tidings.open_store(store_url) as c_store:
                c = ProjectionRunner(c_store, Balances(), lease=lease, owner="c")
                await c.start()
                assert sorted(await shares(a, b, c, within=8 * lease)) == [1, 1, 2]
                await c.stop()
            assert sorted(await shares(a, b, within=8 * lease)) == [2, 2]
            await fill(a_store, each=1)
            await a.wait_for(await a_store.last_position())
            await b.stop()  # b goes: a takes every segment
            assert await shares(a, within=6 * lease) == [4]
            owners = {r.owner for r in await a.status()}
            assert owners == {"a"}
        finally:
            await a.stop()
            await b.stop()
        docs = await ReadModel(a_store, "seg_balances").all()
        assert all(doc["version"] == 6 for doc in docs.values()) and len(docs) == 12


def _fair(segments: int, members: int) -> list[int]:
    base, extra = divmod(segments, members)
    return [base + (i < extra) for i in range(members)]


async def test_a_live_segment_count_changes_only_by_a_rebuild(store: tidings.EventStore) -> None:
    await fill(store)
    await ProjectionRunner(store, Doubled()).catch_up()
    with pytest.raises(ConfigurationError, match=r"stored with 2 segment.*rebuild"):
        await ProjectionRunner(store, Balances()).catch_up()
    with pytest.raises(ConfigurationError, match="rebuild"):
        await ProjectionRunner(store, Unsegmented()).start()
    before = await ReadModel(store, "seg_balances").all()
    runner = ProjectionRunner(store, Balances())
    await runner.rebuild(Balances)  # blue/green, into 4 segments
    assert await ReadModel(store, "seg_balances").all() == before
    await fill(store, each=1)
    await runner.catch_up()
    after = await ReadModel(store, "seg_balances").all()
    assert all(doc["version"] == 6 for doc in after.values())
    rows = {s.name for s in await store.projection_states()}
    assert {f"seg_balances[{k}/4]" for k in range(4)} <= rows
    assert not any(r.startswith("seg_balances[") and r.endswith("/2]") for r in rows)
    await ProjectionRunner(store, Unsegmented()).rebuild("seg_balances")  # back to one
    assert await ReadModel(store, "seg_balances").all() == after
    assert not any(
        r.startswith("seg_balances[") for r in {s.name for s in await store.projection_states()}
    )


# -- a worker process SIGKILLed under load ---------------------------------------------------

APP = """
from tidings import Event, JSONCodec, Projection, RecordedEvent, TypeRegistry, on

REGISTRY = TypeRegistry()
CODEC = JSONCodec(REGISTRY)


class Counted(Event, type="test.segments.counted", registry=REGISTRY):
    n: int


class Tally(Projection, name="segment_tally", segments=2):
    @on(Counted)
    def counted(self, event: Counted, record: RecordedEvent) -> None:
        doc = self.view.get(record.stream_id, {"version": 0, "sum": 0})
        if record.version != doc["version"] + 1:
            raise RuntimeError(f"{record.stream_id}: version {record.version} after {doc}")
        self.view.put(record.stream_id, {"version": record.version, "sum": doc["sum"] + event.n})
"""

LEASE = 1.0


async def start_worker(url: str, folder: Path, owner: str) -> Worker:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *sys.path])}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tidings.cli.main", "worker", "--store", url, "--app",
        "segments_app", "--lease", str(LEASE), "--owner", owner, "--batch-size", "20",
        cwd=folder, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return Worker(process)


async def test_a_killed_worker_s_segment_is_taken_over_and_nothing_is_applied_twice(
    shared_url: str, tmp_path: Path
) -> None:
    (tmp_path / "segments_app.py").write_text(APP)
    sys.path.insert(0, str(tmp_path))
    try:
        import segments_app  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    counted, codec = segments_app.Counted, segments_app.CODEC
    async with tidings.open_store(shared_url, codec=codec) as store:
        for batch in range(20):
            for stream in range(8):
                await store.append(f"t-{stream}", [counted(n=batch * 8 + i) for i in range(5)])
        first = await start_worker(shared_url, tmp_path, "first")
        second: Worker | None = None
        writing = True

        async def keep_writing() -> None:
            n = 0
            while writing:
                await store.append(f"live-{n % 6}", [counted(n=n)])
                n += 1
                await asyncio.sleep(0.01)

        writer = asyncio.create_task(keep_writing())
        try:
            await first.wait_for_line("holds segment_tally[1/2]", 30)
            second = await start_worker(shared_url, tmp_path, "second")
            deadline = time.monotonic() + 20
            while not any(line.startswith("holds segment_tally[") for line in second.lines):
                assert time.monotonic() < deadline, (first.lines, second.lines)
                await asyncio.sleep(0.05)
            await first.stop(signal.SIGKILL)  # under load, holding one segment
            killed_at = time.monotonic()
            deadline = killed_at + 3 * LEASE + 5
            while sum(line.startswith("holds segment_tally[") for line in second.lines) < 2:
                assert time.monotonic() < deadline, second.lines
                await asyncio.sleep(0.05)
            took = time.monotonic() - killed_at
            await asyncio.sleep(0.5)
        finally:
            writing = False
            await writer
        head = await store.last_position()
        for _ in range(600):
            states = [
                s for s in await store.projection_states() if s.name.startswith("segment_tally[")
            ]
            if len(states) == 2 and all(s.position >= head for s in states):
                break
            await asyncio.sleep(0.05)
        actual = await ReadModel(store, "segment_tally").all()
        records = [r async for r in store.read_all()]
        if second is not None:
            await second.stop()
            assert second.process.returncode == 0, second.lines
    assert took <= 2 * LEASE + 2, f"{took:.1f}s to take the dead worker's segment over"
    async with tidings.open_store("memory://", codec=codec) as clean:
        for record in records:
            await clean.append(record.stream_id, [record.event])
        await ProjectionRunner(clean, segments_app.Tally()).catch_up()
        expected = await ReadModel(clean, "segment_tally").all()
    assert actual == expected
    assert sum(doc["version"] for doc in actual.values()) == len(records)


def test_projections_status_shows_one_row_per_segment_with_its_owner(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from tidings.cli.main import app

    url = f"sqlite:///{tmp_path / 'status.db'}"

    async def build() -> None:
        async with tidings.open_store(url) as store:
            await fill(store, streams=6, each=2)
            await ProjectionRunner(store, Balances()).catch_up()
            await store.acquire_lease("projection:seg_balances[1/4]", "worker-7", 60)

    asyncio.run(build())
    cli = CliRunner(env={"COLUMNS": "250", "TIDINGS_STORE": None})
    shown = cli.invoke(app, ["projections", "status", "--store", url])
    assert shown.exit_code == 0, shown.output
    assert "seg_balances [1/4]" in shown.output and "worker-7" in shown.output
    lines = cli.invoke(app, ["projections", "status", "--store", url, "--json"]).output.split("\n")
    rows = [json.loads(line) for line in lines if line.strip()]
    assert [(r["name"], r["segment"], r["segments"]) for r in rows] == [
        ("seg_balances", k, 4) for k in range(4)
    ]
    assert [r["owner"] for r in rows] == [None, "worker-7", None, None]
