"""Projections split into segments: a stable hash of the stream id, a checkpoint and a lease
per segment, runners dividing segments fairly and taking over, and segment counts changed only
by a rebuild; on every store. Worker processes SIGKILLed under load:
tests/reliability/test_segment_kills.py."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import tidings
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
