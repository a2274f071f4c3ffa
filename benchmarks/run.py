"""`make bench`: tidings on SQLite against raw sqlite3 and the eventsourcing library, one run.

    .venv/bin/python benchmarks/run.py            # the full run (about a minute or two)
    .venv/bin/python benchmarks/run.py --quick    # a smoke run with small counts (seconds)

Both sides use the same file layout (tidings' own CREATE TABLE statements), the same pragmas
(WAL, synchronous=FULL, busy_timeout) and the same rows (ids, JSON text). The append scenarios
alternate tidings and raw sqlite3 in blocks of about 100 ms on open files, so the drift of a
small VM's fsync rate hits both sides alike; each is repeated (best round kept per side). The
read scenario times each side twice after a warm-up, alternating which goes first
(`--read-rounds 1` for a single timed read).

Scenarios 5-8 use the aggregate and projection layers (aggregates.py, projections.py,
peer_eventsourcing.py): 5. loading an aggregate of 100,000 events with snapshot_every=100, in
ms per load against a 100-event one (the one ratio whose target is an upper bound); 6.
projection catch-up against a raw sqlite3 loop doing the same reads and writes; 7. and 8. saves
and loads of the same account aggregate against the `eventsourcing` library (9.5.6) on SQLite
with the same settings (WAL, synchronous=FULL).

Prints one table (tidings, the baseline, their ratio, the target, pass or missed) and writes the
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Run as a script (`python benchmarks/run.py`), so this directory is on sys.path already.
import aggregates
import peer_eventsourcing
import projections
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
    aggregate_events: int
    aggregate_loads: int
    catch_up_events: int
    catch_up_rounds: int
    peer_accounts: int
    peer_load_passes: int


FULL = Sizes(
    single_appends=2000,
    batch_appends=300,
    concurrent_tasks=200,
    concurrent_per_task=100,
    read_events=1_000_000,
    rounds=3,
    read_rounds=2,
    aggregate_events=100_000,
    aggregate_loads=2000,
    catch_up_events=200_000,
    catch_up_rounds=2,
    peer_accounts=300,
    peer_load_passes=3,
)
QUICK = Sizes(
    single_appends=1000,
    batch_appends=60,
    concurrent_tasks=200,
    concurrent_per_task=10,
    read_events=50_000,
    rounds=1,
    read_rounds=1,
    aggregate_events=10_000,
    aggregate_loads=200,
    catch_up_events=20_000,
    catch_up_rounds=1,
    peer_accounts=40,
    peer_load_passes=2,
)


@dataclass
class Row:
    """One scenario's figures; the ratio is tidings / baseline, `at_most` flips the target."""

    key: str
    scenario: str
    unit: str
    tidings: float
    baseline: float
    baseline_label: str
    target: float
    target_text: str
    measured: Measured
    at_most: bool = False

    @property
    def ratio(self) -> float:
        return self.tidings / self.baseline

    @property
    def passed(self) -> bool:
        return self.ratio <= self.target if self.at_most else self.ratio >= self.target

    def _round(self, value: float) -> float:
        return round(value, 1 if value >= 100 else 4)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "unit": self.unit,
            "tidings": self._round(self.tidings),
            "baseline": self._round(self.baseline),
            "baseline_label": self.baseline_label,
            "ratio": round(self.ratio, 3),
            "target": self.target,
            "target_direction": "at most" if self.at_most else "at least",
            "target_text": self.target_text,
            "passed": self.passed,
            "runs": {
                "tidings": [self._round(r) for r in self.measured.tidings],
                "baseline": [self._round(r) for r in self.measured.raw],
            },
            "ratio_per_round": [
                round(t / r, 3)
                for t, r in zip(
                    self.measured.tidings,
                    self.measured.raw or [self.baseline] * len(self.measured.tidings),
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


def median(values: list[float]) -> float:
    return statistics.median(values)


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

    rows.append(aggregate_row(sizes, directory, phases))
    rows.append(catch_up_row(sizes, directory, phases))
    rows.extend(peer_rows(sizes, directory, phases))
    return rows


def aggregate_row(sizes: Sizes, directory: str, phases: Phases) -> Row:
    long, short, loads = sizes.aggregate_events, 100, sizes.aggregate_loads
    with (
        phases.phase(
            f"5. saving a {long:,}-event and a {short}-event aggregate", long + short
        ) as advance_build,
        phases.phase(f"5. loading each ({loads:,} loads x 2 sides)", 2 * loads) as advance_load,
    ):
        measured = aggregates.aggregate_load(
            directory, long, loads, advance_build, advance_load, short_events=short
        )
    return Row(
        "aggregate_load_snapshots",
        f"5. aggregate load, {long:,} events, snapshots",
        "ms/load",
        median(measured.tidings),
        median(measured.raw),
        f"load of a {short}-event aggregate, same settings (snapshot_every=100)",
        2.0,
        f"<= 2x {short}-event load",
        measured,
        at_most=True,
    )


def catch_up_row(sizes: Sizes, directory: str, phases: Phases) -> Row:
    n, r = sizes.catch_up_events, sizes.catch_up_rounds
    with phases.phase(f"6. populating {n:,} events", n) as advance:
        master, expected = projections.populate(directory, n, advance)
    with phases.phase(
        f"6. projection catch-up over {n:,} events ({r} round{'s' * (r > 1)} x 2 sides)",
        r * 2 * n,
    ) as advance:
        measured = projections.catch_up(directory, master, expected, n, r, advance)
    aggregates.drop(master)
    return Row(
        "projection_catch_up",
        f"6. projection catch-up, {n:,} events",
        "events/s",
        best(measured.tidings),
        best(measured.raw),
        "raw sqlite3 loop, same reads and writes",
        0.5,
        ">= 0.5x raw",
        measured,
    )


def peer_rows(sizes: Sizes, directory: str, phases: Phases) -> list[Row]:
    accounts, r, passes = sizes.peer_accounts, sizes.rounds, sizes.peer_load_passes
    saves = accounts * 10
    with (
        phases.phase(
            f"7. {saves:,} saves vs eventsourcing ({r} round{'s' * (r > 1)} x 2 sides)",
            r * 2 * saves,
        ) as advance_save,
        phases.phase(
            f"8. {accounts * passes:,} loads vs eventsourcing ({r} round{'s' * (r > 1)} x 2 sides)",
            r * 2 * accounts * passes,
        ) as advance_load,
    ):
        save, load = peer_eventsourcing.versus_eventsourcing(
            directory, accounts, r, passes, advance_save, advance_load
        )
    clients = 32
    with phases.phase(
        f"7b. {saves:,} saves from {clients} concurrent clients vs eventsourcing "
        f"({r} round{'s' * (r > 1)} x 2 sides)",
        r * 2 * (accounts // clients) * clients * 10,
    ) as advance_concurrent:
        concurrent = peer_eventsourcing.concurrent_saves(
            directory, accounts, clients, r, advance_concurrent
        )
    label = f"eventsourcing {peer_eventsourcing.EVENTSOURCING_VERSION}, same work and settings"
    return [
        Row(
            "save_vs_eventsourcing",
            "7. aggregate saves vs eventsourcing",
            "saves/s",
            best(save.tidings),
            best(save.raw),
            label,
            1.5,
            ">= 1.5x eventsourcing",
            save,
        ),
        Row(
            "concurrent_save_vs_eventsourcing",
            f"7b. aggregate saves, {clients} concurrent clients, vs eventsourcing",
            "saves/s",
            best(concurrent.tidings),
            best(concurrent.raw),
            f"eventsourcing {peer_eventsourcing.EVENTSOURCING_VERSION}, {clients} threads",
            1.5,
            ">= 1.5x eventsourcing",
            concurrent,
        ),
        Row(
            "load_vs_eventsourcing",
            "8. aggregate loads vs eventsourcing",
            "loads/s",
            best(load.tidings),
            best(load.raw),
            label,
            1.5,
            ">= 1.5x eventsourcing",
            load,
        ),
    ]


def _figure(value: float, unit: str) -> str:
    return f"{value:,.3f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def table(rows: list[Row], title: str) -> Table:
    out = Table(
        title=title,
        title_justify="left",
        caption=(
            "Ratio = tidings / baseline, rounded towards missing the target. Baselines: raw "
            "sqlite3 doing the same work (1, 2, 4, 6); (1.) = scenario 1's raw single-event "
            "rate, this run (3); the same load of a 100-event aggregate (5); the eventsourcing "
            "library on the same SQLite settings (7, 7b, 8)."
        ),
        caption_justify="left",
    )
    out.add_column("scenario", no_wrap=True)
    out.add_column("tidings", justify="right")
    out.add_column("baseline", justify="right")
    out.add_column("ratio", justify="right")
    out.add_column("target", justify="right")
    out.add_column("pass/fail")
    for row in rows:
        verdict = "[green]pass[/]" if row.passed else "[bold red]MISSED[/]"
        baseline = _figure(row.baseline, row.unit)
        if row.key == "concurrent_single_appends":
            baseline = f"(1.) {baseline}"
        rounding = math.ceil if row.at_most else math.floor
        out.add_row(
            row.scenario,
            _figure(row.tidings, row.unit),
            baseline,
            f"{rounding(row.ratio * 100) / 100:.2f}x",
            row.target_text,
            verdict,
        )
    return out


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "tidings": tidings.__version__,
        "eventsourcing": _version("eventsourcing"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "git_commit": _git_commit(),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


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
        console = Console(width=140)
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
        f"tidings {env['tidings']} vs raw sqlite3 {env['sqlite']} and eventsourcing "
        f"{env['eventsourcing']} — Python {env['python']}, {env['cpus']} CPUs, "
        f"{'quick' if args.quick else 'full'} run; best of {sizes.rounds} (1-3, 7-8), "
        f"{sizes.read_rounds} (4) and {sizes.catch_up_rounds} (6) per side; 5: median of blocks"
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
        "durability": "journal_mode=WAL, synchronous=FULL on both sides of every scenario",
        "method": (
            "Rates are per second (events, saves or loads); the best round per side is reported "
            "and the ratio is best tidings / best baseline. Scenarios 1 and 2 alternate the two "
            "sides block by block on open files; scenario 3's baseline is scenario 1's raw rate "
            "from the same run; scenario 4 reads a copy of the same file on both sides. "
            "Scenario 5 is ms per load: the median over blocks (the two aggregates alternate) "
            "of a 100,000-event aggregate's load against a 100-event one's, both with "
            "snapshot_every=100; its target is an upper bound. Scenario 6 catches a projection "
            "up on a fresh copy of one populated file per side and round. Scenarios 7 and 8 "
            "alternate tidings and eventsourcing 9.5.6 block by block on open files."
        ),
        "scenarios": {row.key: row.to_json() for row in rows},
    }
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
