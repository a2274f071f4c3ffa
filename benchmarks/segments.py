"""Scenario 24: a projection's catch-up split into segments, 2 worker processes against 1.

One SQLite store (synchronous=full) holds N events over 400 streams. The projection has
`segments=2` and a handler that spends about 50 µs of CPU per event (a busy loop, standing
for real work: formatting, a computation) and keeps one document per stream. Each side is
`ProjectionRunner(store, projection, lease=0.3).run()` in worker processes started ahead and
told to go at once (their start-up is not timed): one process running both segments, or two
processes dividing them by lease (their balancing is timed: it is what a user waits for).
The time is from "go" until every segment's checkpoint is at the head (the parent polls the
checkpoints every 20 ms); a fresh projection name per round and side, sides alternating, best
of the rounds. Both sides' read models are checked to equal the expected counts.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlite_store import Measured

STREAMS = 400
WORK_US = 50.0
LEASE = 0.3

WORKER = r"""
import asyncio, os, sys, time
import tidings
from tidings import Event, Projection, ProjectionRunner, RecordedEvent, on


class Ticked(Event, type="bench.segments.ticked"):
    n: int


def busy(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


url, name, go, work = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])


class Counts(Projection, name=name, segments=2):
    @on(Ticked)
    def ticked(self, event: Ticked, record: RecordedEvent) -> None:
        busy(work)
        doc = self.view.get(record.stream_id, 0)
        self.view.put(record.stream_id, doc + 1)


async def main() -> None:
    async with tidings.open_store(url) as store:
        print("ready", flush=True)
        while not os.path.exists(go):
            await asyncio.sleep(0.005)
        await ProjectionRunner(store, Counts(), lease=float(sys.argv[5]), batch_size=500).run()


asyncio.run(main())
"""


async def _fill(url: str, events: int) -> None:
    import tidings

    class Ticked(tidings.Event, type="bench.segments.ticked"):  # the workers' own, by name
        n: int

    async with tidings.open_store(url) as store:
        for batch in range(events // 100):
            stream = f"s-{batch % STREAMS}"
            await store.append(stream, [Ticked(n=batch * 100 + i) for i in range(100)])


async def _round(url: str, folder: str, name: str, workers: int, events: int) -> float:
    import tidings

    script = os.path.join(folder, "segments_worker.py")  # written by `catch_up`
    go = Path(folder) / f"go-{name}"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            script,
            url,
            name,
            str(go),
            str(WORK_US),
            str(LEASE),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(workers)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise SystemExit(f"scenario 24: a worker did not start: {line!r}")
        async with tidings.open_store(url) as store:
            head = await store.last_position()
            go.touch()
            start = time.perf_counter()
            while True:
                states = [
                    s for s in await store.projection_states() if s.name.startswith(f"{name}[")
                ]
                if len(states) == 2 and all(s.position >= head for s in states):
                    break
                if any(p.returncode is not None for p in procs):
                    raise SystemExit("scenario 24: a worker stopped before catching up")
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - start
            docs = await tidings.ReadModel(store, name).all()
            if sum(docs.values()) != events:
                raise SystemExit(f"scenario 24: {sum(docs.values())} events applied, not {events}")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
    return events / elapsed


def catch_up(directory: str, events: int, rounds: int, advance: Callable[[int], None]) -> Measured:
    """Events/s of the catch-up: `tidings` = 2 worker processes, `raw` = 1."""
    measured = Measured(
        info={
            "events": events,
            "streams": STREAMS,
            "handler_cpu_us_per_event": WORK_US,
            "segments": 2,
            "lease_s": LEASE,
            "store": "SQLite, synchronous=full",
            "timed": "from go (workers started and opened ahead) until every segment's "
            "checkpoint is at the head, balancing by lease included",
        }
    )
    with tempfile.TemporaryDirectory(dir=directory) as folder:
        url = "sqlite:///" + os.path.join(folder, "segments.db")
        Path(folder, "segments_worker.py").write_text(WORKER)
        asyncio.run(_fill(url, events))
        for number in range(rounds):
            order = (1, 2) if number % 2 == 0 else (2, 1)
            for workers in order:
                name = f"bench_segments_{number}_{workers}"
                rate = asyncio.run(_round(url, folder, name, workers, events))
                (measured.tidings if workers == 2 else measured.raw).append(rate)
                advance(events)
    return measured


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    found = catch_up(
        tempfile.gettempdir(), 10_000 if quick else 60_000, 1 if quick else 2, lambda n: None
    )
    two, one = max(found.tidings), max(found.raw)
    print(f"2 workers {two:.0f} events/s, 1 worker {one:.0f} events/s: {two / one:.2f}x")
