"""The projection runner of the crash test, as a process the test can SIGKILL.

    python tests/app/crash_runner.py STORE.db [--batch-size N]

Opens the SQLite store, catches the `Tally` projection up to the head of the log, printing a
line per committed batch, and exits 0. Killed at any moment and started again, it must carry
on from its checkpoint: `Tally` raises on any event applied twice or skipped, so the restart
then exits non-zero with a `ProjectionError`.

The test imports this module for the event classes, the projection and `fold`, the same
rules written as a plain loop for the expected read model. Events live in a private
`TypeRegistry` (decode with `CODEC`), so these type names never meet other tests' events.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tidings import (
    Event,
    JSONCodec,
    Projection,
    ProjectionRunner,
    RecordedEvent,
    TypeRegistry,
    on,
    open_store,
)

REGISTRY = TypeRegistry()
CODEC = JSONCodec(REGISTRY)
TOTALS = "$all"
"""The key of the document that folds the whole log (every other key is a stream id)."""


class Credited(Event, type="test.crash.credited", registry=REGISTRY):
    amount: int


class Debited(Event, type="test.crash.debited", registry=REGISTRY):
    amount: int


def _chained(previous: str, *parts: object) -> str:
    text = "|".join(map(str, (previous, *parts)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def step(
    get: Callable[[str], Any], put: Callable[[str, Any], None], record: RecordedEvent[Any]
) -> None:
    """Fold one event into its stream's document and the totals, read by `get`, written by `put`.

    Raises unless the event is the next one of its stream and comes after every event seen
    so far: a batch applied twice, or one lost, cannot go unnoticed.
    """
    amount = amount_of(record.event)
    stream = get(record.stream_id) or {"count": 0, "sum": 0, "last_version": 0, "hash": ""}
    if record.version != stream["last_version"] + 1:
        raise RuntimeError(
            f"{record.stream_id} version {record.version} at position {record.position} "
            f"after version {stream['last_version']}: an event was applied twice or skipped"
        )
    totals = get(TOTALS) or {"count": 0, "sum": 0, "last_position": 0, "hash": ""}
    if record.position <= totals["last_position"]:
        raise RuntimeError(
            f"position {record.position} after position {totals['last_position']}: "
            "an event was applied twice"
        )
    put(
        record.stream_id,
        {
            "count": stream["count"] + 1,
            "sum": stream["sum"] + amount,
            "last_version": record.version,
            "hash": _chained(stream["hash"], record.version, amount),
        },
    )
    put(
        TOTALS,
        {
            "count": totals["count"] + 1,
            "sum": totals["sum"] + amount,
            "last_position": record.position,
            "hash": _chained(totals["hash"], record.position, record.stream_id, amount),
        },
    )


def amount_of(event: Event) -> int:
    if isinstance(event, Credited):
        return event.amount
    if isinstance(event, Debited):
        return -event.amount
    raise TypeError(f"not a crash test event: {event!r}")


def fold(records: Iterable[RecordedEvent[Any]]) -> dict[str, Any]:
    """The read model `Tally` should hold after `records`, built without any runner."""
    documents: dict[str, Any] = {}
    for record in records:
        step(documents.get, documents.__setitem__, record)
    return documents


class Tally(Projection, name="test_crash_tally"):
    """Per stream: count, sum, last version and a hash chain; the same over the whole log."""

    @on(Credited, Debited)
    def counted(self, event: Credited | Debited, record: RecordedEvent[Any]) -> None:
        step(self.view.get, self.view.put, record)


async def catch_up(path: Path, batch_size: int) -> int:
    async with open_store(f"sqlite:///{path}", codec=CODEC) as store:
        runner = ProjectionRunner(store, [Tally()], batch_size=batch_size)
        print("started", flush=True)

        def progress(name: str, position: int, target: int) -> None:
            print(f"at {position} of {target}", flush=True)

        head = await runner.catch_up(progress=progress)
        print(f"caught up at {head}", flush=True)
        return head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the SQLite store file")
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args(argv)
    asyncio.run(catch_up(Path(args.path).resolve(), args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
