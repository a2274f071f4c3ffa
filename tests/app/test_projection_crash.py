"""Issue 3's crash test: SIGKILL the projection runner at random points while it catches up on
20,000 events, restart it each time, and compare the read model with a clean replay.

The runner is `crash_runner.py` in its own process. Its projection raises on an event applied
twice or skipped, so a restart after a non-atomic commit fails loudly; after every kill the
test also checks that the committed documents end exactly at the committed checkpoint.

The seed is printed (shown when the test fails); `TIDINGS_CRASH_SEED=<seed>` replays it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tidings
from tests.app.crash_runner import CODEC, TOTALS, Credited, Debited, Tally, fold
from tidings.store import StoreBase

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="sends SIGKILL"),
]

EVENTS = 20_000
STREAMS = 40
BATCH_SIZE = 10  # small, so catching up takes long enough (~1.5 s) for kills to land in it
MAX_KILLS = 25
KILL_PHASE_LIMIT = 120.0  # seconds, for all the kills together
RUN_TIMEOUT = 60.0  # seconds, for one run of the runner to start, or to finish
MIN_KILLS_MID_CATCH_UP = 5
RUNNER = Path(__file__).with_name("crash_runner.py")


@dataclass
class Run:
    """What one run of the runner printed and how it ended."""

    returncode: int
    lines: list[str] = field(default_factory=list)
    stderr: str = ""

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    @property
    def committed(self) -> bool:
        """Whether it committed at least one batch before it ended."""
        return any(line.startswith("at ") for line in self.lines)

    @property
    def finished(self) -> bool:
        return any(line.startswith("caught up") for line in self.lines)


async def write_events(url: str, rng: random.Random) -> None:
    """EVENTS events over STREAMS streams, appended a few at a time, streams interleaved."""
    async with tidings.open_store(url, codec=CODEC, synchronous="normal") as store:
        written = 0
        while written < EVENTS:
            count = min(rng.randint(1, 8), EVENTS - written)
            events = [
                (Credited if rng.random() < 0.7 else Debited)(amount=rng.randint(1, 1000))
                for _ in range(count)
            ]
            await store.append(f"account-{rng.randrange(STREAMS):02d}", events)
            written += count
        assert await store.last_position() == EVENTS


async def start_runner(db: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(RUNNER),
        str(db),
        "--batch-size",
        str(BATCH_SIZE),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(child: asyncio.subprocess.Process, lines: list[str]) -> Run:
    out, err = await asyncio.wait_for(child.communicate(), RUN_TIMEOUT)
    lines += out.decode().splitlines()
    assert child.returncode is not None
    return Run(child.returncode, lines, err.decode())


async def run_and_kill(db: Path, rng: random.Random) -> Run:
    """Start the runner and SIGKILL it at a random moment, or let it end if it gets there.

    Most kills land a random time after it opened the store, while it catches up; some
    land earlier, while it starts and opens the store.
    """
    child = await start_runner(db)
    assert child.stdout is not None
    lines: list[str] = []
    if rng.random() < 0.2:
        await asyncio.sleep(rng.uniform(0.0, 0.3))
    else:
        line = await asyncio.wait_for(child.stdout.readline(), RUN_TIMEOUT)
        lines.append(line.decode().rstrip("\n"))
        await asyncio.sleep(rng.uniform(0.0, 0.25))
    if child.returncode is None:
        try:
            child.send_signal(signal.SIGKILL)
        except ProcessLookupError:  # it ended just now
            pass
    return await finish(child, lines)


async def committed_state(url: str) -> tuple[int, Any]:
    """The projection's checkpoint and its totals document, as committed."""
    async with tidings.open_store(url, codec=CODEC) as store:
        assert isinstance(store, StoreBase)
        state = await store.projection_state(Tally.name)
        totals = await tidings.ReadModel(store, Tally).get(TOTALS)
    return (0 if state is None else state.position), totals


async def clean_replay(records: list[tidings.RecordedEvent[Any]]) -> dict[str, Any]:
    """The read model a fresh runner builds from the same events in a memory store."""
    async with tidings.open_store("memory://", codec=CODEC) as memory:
        for record in records:  # one append each: positions and versions come out the same
            await memory.append(record.stream_id, [record.event])
        await tidings.ProjectionRunner(memory, [Tally()], batch_size=500).catch_up()
        return await tidings.ReadModel(memory, Tally).all()


def describe(runs: list[Run]) -> str:
    return "; ".join(
        f"run {i}: rc={run.returncode} last={run.lines[-1] if run.lines else '-'}"
        for i, run in enumerate(runs)
    )


def differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [
        f"{key}: {actual.get(key)} != expected {expected.get(key)}"
        for key in sorted(actual.keys() | expected.keys())
        if actual.get(key) != expected.get(key)
    ]


async def test_projection_survives_sigkill_at_random_points(tmp_path: Path) -> None:
    seed = int(os.environ.get("TIDINGS_CRASH_SEED") or random.randrange(2**32))
    print(f"crash test seed: {seed} (TIDINGS_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)
    db = tmp_path / "crash.db"
    url = f"sqlite:///{db}"
    await write_events(url, rng)

    runs: list[Run] = []
    checkpoint = 0
    deadline = time.monotonic() + KILL_PHASE_LIMIT
    while len(runs) < MAX_KILLS and time.monotonic() < deadline:
        run = await run_and_kill(db, rng)
        runs.append(run)
        assert run.killed or run.returncode == 0, (
            f"seed {seed}: run {len(runs) - 1} failed on its own after a kill:\n{run.stderr}"
        )
        position, totals = await committed_state(url)
        assert position >= checkpoint, f"seed {seed}: the checkpoint went back to {position}"
        checkpoint = position
        # Documents and checkpoint are committed together: the totals end exactly there.
        assert (totals or {}).get("last_position", 0) == position, (
            f"seed {seed}: checkpoint {position} but documents at {totals}"
        )
        if run.finished:
            break

    final = await finish(await start_runner(db), [])
    runs.append(final)
    kills = [run for run in runs if run.killed]
    mid_catch_up = [run for run in kills if run.committed and not run.finished]
    print(
        f"{len(kills)} kills, {len(mid_catch_up)} after a commit while catching up; "
        f"{describe(runs)}"
    )
    assert final.returncode == 0, f"seed {seed}: the last run failed:\n{final.stderr}"
    assert final.finished, f"seed {seed}: the last run did not catch up: {final.lines[-3:]}"
    assert len(mid_catch_up) >= MIN_KILLS_MID_CATCH_UP, (
        f"seed {seed}: only {len(mid_catch_up)} kills landed while catching up "
        f"({describe(runs)}); lower BATCH_SIZE so catching up takes longer"
    )

    async with tidings.open_store(url, codec=CODEC) as store:
        assert isinstance(store, StoreBase)
        records = [record async for record in store.read_all()]
        state = await store.projection_state(Tally.name)
        actual = await tidings.ReadModel(store, Tally).all()
    assert len(records) == EVENTS
    assert state is not None and state.position == records[-1].position == EVENTS
    expected = fold(records)
    assert len(expected) == STREAMS + 1
    assert expected[TOTALS]["count"] == EVENTS
    assert await clean_replay(records) == expected
    assert actual == expected, f"seed {seed}: " + "\n".join(differences(actual, expected)[:20])
