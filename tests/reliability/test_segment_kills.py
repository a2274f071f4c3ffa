"""A projection split into segments, run by two `tidings worker` processes under load: one
worker is SIGKILLed, a fresh one starts, and again (issue 21).

Each kill lands on a worker holding at least one segment; the survivor takes the dead one's
segments over once their leases expire (within about 1.3 leases, `TAKEOVER_BOUND` stated
with room for a busy machine), and a replacement joins and gets its share back. The handler
raises on a version applied twice or skipped, so a double or a loss would stop the
projection; at the end the read model must equal a clean replay of the log.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import tidings
from tests.app.test_worker_takeover import Worker
from tests.reliability.harness import Row, reliability, report, scale, stopwatch

pytestmark = [
    reliability,
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="signals worker processes"),
]

KILLS = scale(1, 6)
LEASE = 1.0
TAKEOVER_BOUND = 2 * LEASE + 3  # seconds from a kill to the survivor holding every segment

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


async def start_worker(url: str, folder: Path, owner: str) -> Worker:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *sys.path])}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tidings.cli.main", "worker", "--store", url, "--app",
        "segments_app", "--lease", str(LEASE), "--owner", owner, "--batch-size", "20",
        cwd=folder, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return Worker(process)


def holding(worker: Worker) -> set[str]:
    """The segments `worker` says it holds now (its last `holds` or `waiting` line of each)."""
    now: dict[str, bool] = {}
    for line in worker.lines:
        word, _, name = line.partition(" ")
        if word in ("holds", "waiting") and name.startswith("segment_tally["):
            now[name] = word == "holds"
    return {name for name, held in now.items() if held}


async def until(check: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_sigkilled_workers_segments_are_taken_over_and_nothing_is_applied_twice(
    shared_url: str, tmp_path: Path
) -> None:
    (tmp_path / "segments_app.py").write_text(APP)
    sys.path.insert(0, str(tmp_path))
    try:
        import segments_app  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    counted, codec = segments_app.Counted, segments_app.CODEC
    takeovers: list[float] = []
    with stopwatch() as took:
        async with tidings.open_store(shared_url, codec=codec) as store:
            for batch in range(20):
                for stream in range(8):
                    await store.append(f"t-{stream}", [counted(n=batch * 8 + i) for i in range(5)])
            workers = [
                await start_worker(shared_url, tmp_path, "w0"),
                await start_worker(shared_url, tmp_path, "w1"),
            ]
            writing = True

            async def keep_writing() -> None:
                n = 0
                while writing:
                    await store.append(f"live-{n % 6}", [counted(n=n)])
                    n += 1
                    await asyncio.sleep(0.01)

            writer = asyncio.create_task(keep_writing())
            try:
                for kill in range(KILLS):
                    a, b = workers
                    await until(
                        lambda a=a, b=b: holding(a) and holding(b), 30, "both workers holding"
                    )
                    await a.stop(signal.SIGKILL)  # under load, holding at least one segment
                    takeovers.append(
                        await until(
                            lambda b=b: len(holding(b)) == 2,
                            TAKEOVER_BOUND + 10,
                            "the survivor holding both segments",
                        )
                    )
                    workers = [b, await start_worker(shared_url, tmp_path, f"w{kill + 2}")]
                # The last newcomer gets its share too (and is past its start-up, where a
                # SIGTERM could only kill it: its handler is not installed yet).
                a, b = workers
                await until(
                    lambda a=a, b=b: holding(a) and holding(b), 30, "both workers holding"
                )
                await asyncio.sleep(0.5)
            finally:
                writing = False
                await writer
            head = await store.last_position()
            for _ in range(600):
                rows = [
                    s
                    for s in await store.projection_states()
                    if s.name.startswith("segment_tally[")
                ]
                if len(rows) == 2 and all(s.position >= head for s in rows):
                    break
                await asyncio.sleep(0.05)
            actual = await tidings.ReadModel(store, "segment_tally").all()
            records = [r async for r in store.read_all()]
            for worker in workers:
                await worker.stop()
                assert worker.process.returncode == 0, worker.lines
    async with tidings.open_store("memory://", codec=codec) as clean:
        for record in records:
            await clean.append(record.stream_id, [record.event])
        await tidings.ProjectionRunner(clean, segments_app.Tally()).catch_up()
        expected = await tidings.ReadModel(clean, "segment_tally").all()
    applied = sum(doc["version"] for doc in actual.values())
    report(
        Row(
            scenario="SIGKILL of a worker running segments of a projection",
            backend=shared_url.split(":")[0],
            load=f"{len(records):,} events, 14 streams, 2 segments, 2 workers",
            faults=f"{KILLS} SIGKILL{'s' * (KILLS > 1)}, a new worker after each",
            events_in=len(records),
            events_out=applied,
            lost=max(0, len(records) - applied) + (actual != expected),
            duplicated=max(0, applied - len(records)),
            recover_seconds=max(takeovers),
            notes=f"takeover within {max(takeovers):.1f}s (bound {TAKEOVER_BOUND:g}s)",
            seconds=took[0],
        )
    )
    assert actual == expected
    assert max(takeovers) <= TAKEOVER_BOUND, takeovers
