"""Two `tidings worker` processes share a projection by lease: SIGKILL the owner and the
other takes over from the committed checkpoint, and the read model equals a clean replay."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import tidings

APP = """
from tidings import Event, JSONCodec, Projection, RecordedEvent, TypeRegistry, on

REGISTRY = TypeRegistry()
CODEC = JSONCodec(REGISTRY)


class Counted(Event, type="test.takeover.counted", registry=REGISTRY):
    n: int


class Tally(Projection, name="takeover_tally"):
    @on(Counted)
    def counted(self, event: Counted, record: RecordedEvent) -> None:
        doc = self.view.get(record.stream_id, {"version": 0, "sum": 0})
        if record.version != doc["version"] + 1:
            raise RuntimeError(f"{record.stream_id}: version {record.version} after {doc}")
        self.view.put(record.stream_id, {"version": record.version, "sum": doc["sum"] + event.n})
"""

TAKEOVER_LIMIT = 10.0  # seconds, from the issue
LEASE = 2.0


class Worker:
    """One `tidings worker` subprocess and the lines it printed."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode().rstrip())

    async def wait_for_line(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.lines:
                return time.monotonic()
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.02)
        stderr = b""
        if self.process.returncode is not None and self.process.stderr is not None:
            stderr = await self.process.stderr.read()
        raise AssertionError(f"no {text!r} within {timeout}s: {self.lines} {stderr.decode()}")

    async def stop(self, how: int = signal.SIGTERM) -> None:
        if self.process.returncode is None:
            self.process.send_signal(how)
        await asyncio.wait_for(self.process.wait(), 20)
        await self.reader


async def checkpoint_reaches(store: Any, position: int, timeout: float) -> None:
    for _ in range(int(timeout / 0.05)):
        state = await store.projection_state("takeover_tally")
        if state is not None and state.position >= position:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the projection did not reach {position} within {timeout}s")


async def start_worker(url: str, folder: Path, owner: str) -> Worker:
    env = {**os.environ, "PYTHONPATH": str(folder)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tidings.cli.main", "worker", "--store", url, "--app",
        "takeover_app", "--lease", str(LEASE), "--owner", owner, "--batch-size", "50",
        cwd=folder, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return Worker(process)


async def test_a_killed_owner_is_replaced_within_ten_seconds(
    shared_url: str, tmp_path: Path
) -> None:
    (tmp_path / "takeover_app.py").write_text(APP)
    sys.path.insert(0, str(tmp_path))
    try:
        import takeover_app  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    counted, codec = takeover_app.Counted, takeover_app.CODEC

    async with tidings.open_store(shared_url, codec=codec) as store:
        for batch in range(40):
            for stream in range(5):
                await store.append(f"t-{stream}", [counted(n=batch * 5 + i) for i in range(10)])
        first = await start_worker(shared_url, tmp_path, "first")
        second: Worker | None = None
        writing = True

        async def keep_writing() -> None:
            n = 0
            while writing:
                await store.append(f"live-{n % 3}", [counted(n=n)])
                n += 1
                await asyncio.sleep(0.02)

        writer = asyncio.create_task(keep_writing())
        try:
            await first.wait_for_line("holds takeover_tally", 30)
            second = await start_worker(shared_url, tmp_path, "second")
            await second.wait_for_line("waiting takeover_tally", 30)
            await checkpoint_reaches(store, 100, timeout=30)
            assert "holds takeover_tally" not in second.lines  # one owner at a time
            await first.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            taken_at = await second.wait_for_line("holds takeover_tally", TAKEOVER_LIMIT + 5)
            assert taken_at - killed_at <= TAKEOVER_LIMIT
            before = (await store.projection_state("takeover_tally")).position
            await asyncio.sleep(0.5)
        finally:
            writing = False
            await writer
        head = await store.last_position()
        await checkpoint_reaches(store, head, timeout=30)
        assert head > before  # events written after the kill were applied by the second
        actual = await tidings.ReadModel(store, "takeover_tally").all()
        records = [r async for r in store.read_all()]
        if second is not None:
            await second.stop()
            assert second.process.returncode == 0, second.lines

    async with tidings.open_store("memory://", codec=codec) as clean:
        for record in records:
            await clean.append(record.stream_id, [record.event])
        await tidings.ProjectionRunner(clean, takeover_app.Tally()).catch_up()
        expected = await tidings.ReadModel(clean, "takeover_tally").all()
    assert actual == expected
    assert sum(doc["version"] for doc in actual.values()) == len(records)
