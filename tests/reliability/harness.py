"""What every reliability scenario shares: its scale, its report row, and its verdict.

A scenario runs short under `make test` and long under `make reliability`
(`TIDINGS_RELIABILITY=long`): `scale(short, long)` picks the figure. Each scenario ends by
calling `report(Row(...))`, which prints the row, appends it to the JSON Lines file named by
`$TIDINGS_RELIABILITY_RESULTS` (when set; `make reliability` renders that file into
`reliability-report.md`), and fails the test when anything was lost or done twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import pytest

LONG = os.environ.get("TIDINGS_RELIABILITY", "short") == "long"
RESULTS = os.environ.get("TIDINGS_RELIABILITY_RESULTS", "")

reliability = pytest.mark.reliability
"""Marks a reliability scenario (`pytest -m reliability` runs them alone)."""


def scale(short: int, long: int) -> int:
    """`long` under `make reliability`, else `short` (the version `make test` runs)."""
    return long if LONG else short


@dataclass
class Row:
    """One line of the reliability report."""

    scenario: str
    """What was done, e.g. "SIGKILL of the outbox relay"."""
    backend: str
    """Where, e.g. "SQLite + Redis"."""
    load: str
    """The work it ran under, e.g. "10,000 events, 25 streams"."""
    faults: str
    """What was injected and how often, e.g. "50 SIGKILLs"."""
    events_in: int
    """Events (or messages, or operations) the scenario put in."""
    events_out: int
    """What came out at the far end (distinct), to compare with `events_in`."""
    lost: int
    """Put in, never came out (must be 0)."""
    duplicated: int
    """Side effects that happened more than once (must be 0)."""
    recover_seconds: float | None = None
    """The longest time from a fault to the system working again (None: not measured)."""
    notes: str = ""
    seconds: float = 0.0
    """How long the scenario ran."""
    mode: str = field(default_factory=lambda: "long" if LONG else "short")


def report(row: Row) -> None:
    """Print and keep `row`; fail the test if anything was lost or duplicated."""
    line = json.dumps(asdict(row))
    print(f"reliability: {line}")
    if RESULTS:
        with open(RESULTS, "a", encoding="utf-8") as out:
            out.write(line + "\n")
    assert row.lost == 0, f"{row.scenario} on {row.backend}: {row.lost} lost"
    assert row.duplicated == 0, f"{row.scenario} on {row.backend}: {row.duplicated} duplicated"


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as took:` ... `took[0]` is the block's duration in seconds."""
    took = [0.0]
    started = time.perf_counter()
    try:
        yield took
    finally:
        took[0] = time.perf_counter() - started
