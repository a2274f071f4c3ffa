"""`make bench`: the SQLite event store against raw sqlite3 doing the same work, in one run.

    .venv/bin/python benchmarks/run.py            # the full run (about a minute or two)
    .venv/bin/python benchmarks/run.py --quick    # a smoke run with small counts (seconds)

Both sides use the same file layout (tidings' own CREATE TABLE statements), the same pragmas
(WAL, synchronous=FULL, busy_timeout) and the same rows (ids, JSON text). The append scenarios
alternate tidings and raw sqlite3 in blocks of about 100 ms on open files, so the drift of a
small VM's fsync rate hits both sides alike; each is repeated (best round kept per side). The
read scenario times each side twice after a warm-up, alternating which goes first
(`--read-rounds 1` for a single timed read).

Prints one table (tidings, raw sqlite3, their ratio, the target, pass or missed) and writes the
same numbers to benchmarks/results.json (a --quick run writes results-quick.json instead, so it
never overwrites the numbers the README quotes). A missed target is reported, not an error: the
exit code is 0 whenever the benchmark itself ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Run as a script (`python benchmarks/run.py`), so this directory is on sys.path already.
import sqlite_store
import tidings
from sqlite_store import Measured
from workload import check_same_encoding

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Sizes:
    single_appends: int
    batch_appends: int
    concurrent_tasks: int
    concurrent_per_task: int
    read_events: int
    rounds: int
    read_rounds: int


FULL = Sizes(
    single_appends=2000,
    batch_appends=300,
    concurrent_tasks=200,
    concurrent_per_task=100,
    read_events=1_000_000,
    rounds=3,
    read_rounds=2,
)
QUICK = Sizes(
    single_appends=1000,
    batch_appends=60,
    concurrent_tasks=200,
    concurrent_per_task=10,
    read_events=50_000,
    rounds=1,
    read_rounds=1,
)


@dataclass
class Row:
    key: str
    scenario: str
    unit: str
    tidings: float
    raw: float
    raw_label: str
    target: float
    target_text: str
    measured: Measured

    @property
    def ratio(self) -> float:
        return self.tidings / self.raw

    @property
    def passed(self) -> bool:
        return self.ratio >= self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "unit": self.unit,
            "tidings": round(self.tidings, 1),
            "raw_sqlite3": round(self.raw, 1),
            "raw_baseline": self.raw_label,
            "ratio": round(self.ratio, 3),
            "target": self.target,
            "target_text": self.target_text,
            "passed": self.passed,
            "runs": {
                "tidings": [round(r, 1) for r in self.measured.tidings],
                "raw_sqlite3": [round(r, 1) for r in self.measured.raw],
            },
            "ratio_per_round": [
                round(t / r, 3)
                for t, r in zip(
                    self.measured.tidings,
                    self.measured.raw or [self.raw] * len(self.measured.tidings),
                    strict=True,
                )
            ],
            "parameters": self.measured.info,
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts for every scenario: a smoke run in seconds",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help="events in the read_all scenario (default 1,000,000; 50,000 with --quick)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of the append scenarios, best kept (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--read-rounds",
        type=int,
        default=None,
        help="timed reads per side in scenario 4, best kept (default 2; 1 with --quick)",
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="where to make the temporary directory for the database files "
        "(default: the system's; it must be a real disk for fsync to count)",
    )
    parser.add_argument(
        "--json",
        default=None,
        help="where to write the results (default benchmarks/results.json, "
        "benchmarks/results-quick.json with --quick)",
    )
    args = parser.parse_args(argv)
    for name in ("events", "rounds", "read_rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


class Phases:
    """One rich progress bar per phase, advanced in chunks from inside the timed loops."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    @contextmanager
    def phase(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        task = self.progress.add_task(description, total=total)
        progress = self.progress

        def advance(n: int) -> None:
            progress.advance(task, n)

        yield advance
        progress.update(task, completed=total)


def best(rates: list[float]) -> float:
    return max(rates)


def run(sizes: Sizes, directory: str, phases: Phases) -> list[Row]:
    rows: list[Row] = []
    r = sizes.rounds

    with phases.phase(
        f"1. single-event appends ({r} rounds x 2 sides)", r * 2 * sizes.single_appends
    ) as advance:
        single = sqlite_store.single_appends(directory, sizes.single_appends, r, advance)
    rows.append(
        Row(
            "single_event_appends",
            "1. single-event appends (FULL)",
            "events/s",
            best(single.tidings),
            best(single.raw),
            "raw sqlite3, same work",
            0.8,
            ">= 0.8x raw",
            single,
        )
    )

    batch_events = sizes.batch_appends * 100
    with phases.phase(
        f"2. 100-event appends ({r} rounds x 2 sides)", r * 2 * batch_events
    ) as advance:
        batch = sqlite_store.batch_appends(directory, sizes.batch_appends, r, advance)
    rows.append(
        Row(
            "batch_appends_100",
            "2. 100-event appends",
            "events/s",
            best(batch.tidings),
            best(batch.raw),
            "raw sqlite3 executemany, same work",
            0.6,
            ">= 0.6x raw",
            batch,
        )
    )

    concurrent_events = sizes.concurrent_tasks * sizes.concurrent_per_task
    with phases.phase(
        f"3. {sizes.concurrent_tasks} concurrent appenders ({r} rounds)", r * concurrent_events
    ) as advance:
        concurrent = sqlite_store.concurrent_appends(
            directory, sizes.concurrent_tasks, sizes.concurrent_per_task, r, advance
        )
    concurrent.info["raw_baseline"] = "scenario 1's raw sqlite3 single-event rate (best round)"
    rows.append(
        Row(
            "concurrent_single_appends",
            f"3. {sizes.concurrent_tasks} concurrent appenders",
            "events/s",
            best(concurrent.tidings),
            best(single.raw),
            "scenario 1 raw rate",
            5.0,
            ">= 5x raw single",
            concurrent,
        )
    )

    n = sizes.read_events
    with phases.phase(f"4. populating {n:,} events", n) as advance:
        tidings_path, raw_path = sqlite_store.populate(directory, n, advance)
    rr = sizes.read_rounds
    with phases.phase(
        f"4. read_all of {n:,} events ({rr} round{'s' * (rr > 1)} x 2 sides)", rr * 2 * n
    ) as advance:
        reads = sqlite_store.read_all(tidings_path, raw_path, n, rr, advance)
    rows.append(
        Row(
            "read_all_decoded",
            f"4. read_all {n:,}, decoded",
            "events/s",
            best(reads.tidings),
            best(reads.raw),
            "raw sqlite3 + json.loads",
            0.5,
            ">= 0.5x raw",
            reads,
        )
    )
    return rows


def table(rows: list[Row], title: str) -> Table:
    out = Table(
        title=title,
        title_justify="left",
        caption="Ratios are rounded down. (1.) = scenario 1's raw single-event rate, this run.",
        caption_justify="left",
    )
    out.add_column("scenario", no_wrap=True)
    out.add_column("tidings events/s", justify="right")
    out.add_column("raw sqlite3 events/s", justify="right")
    out.add_column("ratio tidings/raw", justify="right")
    out.add_column("target", justify="right")
    out.add_column("pass/fail")
    for row in rows:
        verdict = "[green]pass[/]" if row.passed else "[bold red]MISSED[/]"
        raw = f"{row.raw:,.0f}"
        if row.key == "concurrent_single_appends":
            raw = f"(1.) {raw}"
        out.add_row(
            row.scenario,
            f"{row.tidings:,.0f}",
            raw,
            f"{math.floor(row.ratio * 100) / 100:.2f}x",
            row.target_text,
            verdict,
        )
    return out


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "tidings": tidings.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    """The checkout's commit, with `-dirty` when src/ has uncommitted changes."""
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=HERE, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--", "../src") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for option, size in (
        ("events", "read_events"),
        ("rounds", "rounds"),
        ("read_rounds", "read_rounds"),
    ):
        if getattr(args, option) is not None:
            sizes = dataclasses.replace(sizes, **{size: getattr(args, option)})
    default_json = "results-quick.json" if args.quick else "results.json"
    json_path = args.json or os.path.join(HERE, default_json)

    console = Console()
    if not console.is_terminal:  # piped (make bench | tee): do not squeeze the table into 80
        console = Console(width=110)
    check_same_encoding()
    started = time.perf_counter()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=4,
    )
    with tempfile.TemporaryDirectory(prefix="tidings-bench-", dir=args.dir) as directory, progress:
        rows = run(sizes, directory, Phases(progress))
    seconds = time.perf_counter() - started

    env = environment()
    title = (
        f"tidings {env['tidings']} vs raw sqlite3 {env['sqlite']} — Python {env['python']}, "
        f"{env['cpus']} CPUs, {'quick' if args.quick else 'full'} run; best of "
        f"{sizes.rounds} (1-3) and {sizes.read_rounds} (4) per side"
    )
    console.print(table(rows, title))
    missed = [row.scenario for row in rows if not row.passed]
    if missed:
        console.print(f"[bold red]Missed {len(missed)} target(s):[/] " + "; ".join(missed))
    else:
        console.print("[green]Every target met.[/]")
    console.print(f"Took {seconds:.0f} s. Results written to {os.path.relpath(json_path)}.")

    result = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": "quick" if args.quick else "full",
        "seconds": round(seconds, 1),
        "environment": env,
        "durability": "journal_mode=WAL, synchronous=FULL on both sides",
        "method": (
            "Rates are events per second; the best round per side is reported and the ratio is "
            "best tidings / best raw. Scenarios 1 and 2 alternate the two sides block by block "
            "on open files; scenario 3's baseline is scenario 1's raw rate from the same run; "
            "scenario 4 reads a copy of the same file on both sides."
        ),
        "scenarios": {row.key: row.to_json() for row in rows},
    }
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
