"""`make bench-scale` (run.py --scale): how the cost of the stores grows with the log.

At each size of `--scale-sizes` (default 10^5, 10^6 and 10^7 events), on the SQLite store (a
file in the run's temporary directory, WAL, synchronous=FULL) and on the PostgreSQL store (the
server at `--postgres`, in a schema of its own, dropped at the end; skipped, saying why, when
the server is unreachable):

- S1. append: the events that take the store from the previous size to this one, in appends of
  1,000 events (`store.append(stream, events, expected_version)`, one transaction each),
  append call k to stream `account-<k % 1000>`. The events (`workload.Deposited`) are built
  before each call, outside the clock; the rate is the step's events over the time spent in
  `store.append`. The sizes grow cumulatively: the store is never rebuilt.
- S2. read_all: `store.read_all()` over the whole store at this size, every record decoded.
- S3. subscription catch-up: `store.subscribe(0)` from position 0 until it yields the head
  (`store.last_position()`, read first), every record decoded.
- S4. projection catch-up, up to `--scale-projection-max` events (default 10^6; at 10^7 it
  would take several minutes per backend): two projections (`scale_balances`: a stream's
  running balance; `scale_deposits`: a stream's count of deposits and last account; both
  one document per stream) from position 0 to the head, run by `ProjectionRunner(...,
  batch_size=1000, lease=30)` (a) in one worker process running both, against (b) two worker
  processes, one projection each, each holding its projection's lease. tidings cannot split
  one projection across processes today: a lease is per projection, so extra workers only
  help when there are several projections (segments of one projection are future work). The
  figure is the head over the wall time from the go signal (sent to every worker at once,
  after each has opened its store) until every projection has reached the head. Each
  measurement uses projection names of its own, so each starts from 0.

Every measurement runs in a fresh child process (`python benchmarks/scale.py child JSON`),
which reports its peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`, MiB, and the same just before
the work, after imports), so the memory figure is that of the operation alone. The children
report progress and results as JSON lines on stdout.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from tidings import Projection, ProjectionRunner, RecordedEvent, on, open_store
from workload import Deposited, make_items

Advance = Callable[[int], None]
PhaseOf = Callable[[str, int], Any]  # run.Phases.phase: (description, total) -> context

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SIZES = "100000,1000000,10000000"
PROJECTION_MAX = 1_000_000
BATCH = 1000  # events per append call, and per projection batch
STREAMS = 1000
LEASE = 30.0  # seconds
BACKENDS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


# -- the child process ---------------------------------------------------------------------


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_now_mib() -> float | None:
    """The resident set now (Linux /proc), which shows growth below an import-time peak."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _go(rss_start: float) -> None:
    """Tell the parent this child is ready, and wait for its go (one line on stdin)."""
    _say({"ready": True, "rss_start_mib": round(rss_start, 1)})
    await asyncio.to_thread(sys.stdin.readline)


def _open(spec: dict[str, Any]) -> Any:
    return open_store(spec["url"], **spec.get("options", {}))


async def _append(spec: dict[str, Any]) -> dict[str, Any]:
    first, calls = spec["first_call"], spec["calls"]
    async with _open(spec) as store:
        rss_start = _rss_mib()
        await _go(rss_start)
        spent = 0.0
        wall = time.perf_counter()
        for k in range(first, first + calls):
            events = [item.event for item in make_items(BATCH, seed=k)]
            stream = f"account-{k % STREAMS}"
            expected = (k // STREAMS) * BATCH
            start = time.perf_counter()
            await store.append(stream, events, expected)
            spent += time.perf_counter() - start
            if (k - first) % 10 == 9:
                _say({"advance": 10 * BATCH})
        wall = time.perf_counter() - wall
        head = await store.last_position()
    return {
        "events": calls * BATCH,
        "seconds": round(spent, 3),
        "wall_seconds": round(wall, 3),
        "rate": round(calls * BATCH / spent, 1),
        "head": head,
        "rss_start_mib": round(rss_start, 1),
        "rss_peak_mib": round(_rss_mib(), 1),
        "rss_end_mib": _round(_rss_now_mib()),
        "store_mib": round(await _store_bytes(spec) / 2**20, 1),
    }


def _file_bytes(path: str) -> int:
    return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))


async def _store_bytes(spec: dict[str, Any]) -> int:
    """The file (with its WAL) for SQLite; tables, indexes and TOAST of the schema for PG."""
    if spec["backend"] == "sqlite":
        return await asyncio.to_thread(_file_bytes, spec["path"])
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(spec["url"], timeout=10)
    try:
        return int(
            await conn.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = $1 AND c.relkind = 'r'",
                spec["options"]["schema"],
            )
        )
    finally:
        await conn.close()


async def _read(spec: dict[str, Any], subscribe: bool) -> dict[str, Any]:
    step = max(1, spec["events"] // 100)
    async with _open(spec) as store:
        head = await store.last_position()
        rss_start = _rss_mib()
        await _go(rss_start)
        gc.collect()
        count = 0
        mark = step
        start = time.perf_counter()
        if subscribe:
            async with aclosing(store.subscribe(0)) as records:
                async for record in records:
                    record.event  # noqa: B018 - touch it, as a reader would
                    count += 1
                    if count == mark:
                        _say({"advance": step})
                        mark += step
                    if record.position >= head:
                        break
        else:
            async for record in store.read_all():
                record.event  # noqa: B018
                count += 1
                if count == mark:
                    _say({"advance": step})
                    mark += step
        elapsed = time.perf_counter() - start
    if count != spec["events"]:
        raise SystemExit(f"read {count} events, expected {spec['events']}")
    return {
        "events": count,
        "seconds": round(elapsed, 3),
        "rate": round(count / elapsed, 1),
        "rss_start_mib": round(rss_start, 1),
        "rss_peak_mib": round(_rss_mib(), 1),
        "rss_end_mib": _round(_rss_now_mib()),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class Balances(Projection, name="scale_balances"):
    """A stream's running balance (renamed per measurement, so each starts from 0)."""

    @on(Deposited)
    def deposited(self, event: Deposited, record: RecordedEvent[Deposited]) -> None:
        doc = self.view.get(record.stream_id) or {"balance": 0}
        doc["balance"] += event.amount
        self.view.put(record.stream_id, doc)


class Deposits(Projection, name="scale_deposits"):
    """A stream's count of deposits and the last account named."""

    @on(Deposited)
    def deposited(self, event: Deposited, record: RecordedEvent[Deposited]) -> None:
        doc = self.view.get(record.stream_id) or {"count": 0}
        doc["count"] += 1
        doc["last"] = event.account
        self.view.put(record.stream_id, doc)


KINDS: dict[str, type[Projection]] = {"balances": Balances, "deposits": Deposits}


def _projection(kind: str, name: str) -> Projection:
    cls = types.new_class(KINDS[kind].__name__, (KINDS[kind],), {"name": name})
    return cls()


async def _project(spec: dict[str, Any]) -> dict[str, Any]:
    projections = [_projection(kind, name) for kind, name in spec["projections"]]
    async with _open(spec) as store:
        head = await store.last_position()
        runner = ProjectionRunner(store, projections, batch_size=BATCH, lease=LEASE)
        rss_start = _rss_mib()
        await _go(rss_start)
        gc.collect()
        start = time.perf_counter()
        await runner.start()
        try:
            reached = 0
            for part in range(1, 21):  # progress in twentieths, through the public API
                target = head * part // 20
                await runner.wait_for(target, timeout=None)
                _say({"advance": (target - reached) * len(projections)})
                reached = target
            elapsed = time.perf_counter() - start
            held = runner.leases()
        finally:
            await runner.stop()
        states = {s.name: s.position for s in await store.projection_states()}
    for _, name in spec["projections"]:
        if states.get(name) != head:
            raise SystemExit(f"projection {name} at {states.get(name)}, expected {head}")
    return {
        "events": head,
        "projections": [name for _, name in spec["projections"]],
        "seconds": round(elapsed, 3),
        "leases_held": held,
        "rss_start_mib": round(rss_start, 1),
        "rss_peak_mib": round(_rss_mib(), 1),
        "rss_end_mib": _round(_rss_now_mib()),
    }


def child(spec: dict[str, Any]) -> None:
    job = spec["job"]
    if job == "append":
        result = asyncio.run(_append(spec))
    elif job in ("read_all", "subscribe"):
        result = asyncio.run(_read(spec, subscribe=job == "subscribe"))
    elif job == "project":
        result = asyncio.run(_project(spec))
    else:
        raise SystemExit(f"unknown job {job!r}")
    _say({"result": result})


# -- the parent: children, measurements, table, plot ---------------------------------------


class _Child:
    """One child process; a thread turns its stdout lines into messages on `inbox`."""

    def __init__(self, spec: dict[str, Any], inbox: queue.Queue[tuple[_Child, Any]]) -> None:
        self.spec = spec
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by run_children
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "scale.py"), "child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )
        self.result: dict[str, Any] | None = None
        self.ready: dict[str, Any] | None = None
        self.finished_at = 0.0
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()

    def _read(self, inbox: queue.Queue[tuple[_Child, Any]]) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            inbox.put((self, json.loads(line)))
        inbox.put((self, None))  # end of output

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def failure(self) -> str:
        self.stderr.seek(0)
        tail = self.stderr.read()[-2000:].strip()
        return f"child {self.spec['job']} exited with {self.process.returncode}: {tail}"


def run_children(specs: list[dict[str, Any]], advance: Advance) -> tuple[list[Any], float]:
    """Start the children, send every one the go once all are ready, and collect their
    results; also the wall time from the go until the last result."""
    inbox: queue.Queue[tuple[_Child, Any]] = queue.Queue()
    children = [_Child(spec, inbox) for spec in specs]
    started = 0.0
    ended = 0
    try:
        while ended < len(children):
            who, message = inbox.get()
            if message is None:
                ended += 1
                who.process.wait()
                if who.result is None:
                    raise SystemExit(who.failure())
            elif "advance" in message:
                advance(message["advance"])
            elif "ready" in message:
                who.ready = message
                if all(c.ready is not None for c in children):
                    started = time.perf_counter()
                    for c in children:
                        c.go()
            elif "result" in message:
                who.result = message["result"]
                who.finished_at = time.perf_counter()
    finally:
        for c in children:
            if c.process.poll() is None:
                c.process.kill()
                c.process.wait()
            c.stderr.close()
    wall = max(c.finished_at for c in children) - started
    return [c.result for c in children], wall


@dataclass
class Backend:
    """Where one backend's store lives, or why it is skipped."""

    key: str
    url: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    path: str = ""  # the SQLite file
    skipped: str | None = None

    def spec(self, job: str, **more: Any) -> dict[str, Any]:
        return {
            "job": job,
            "backend": self.key,
            "url": self.url,
            "options": self.options,
            "path": self.path,
            **more,
        }


def measure(
    sizes: list[int],
    backends: list[Backend],
    phase: PhaseOf,
    projection_max: int = PROJECTION_MAX,
) -> dict[str, list[dict[str, Any]]]:
    """Every scenario at every size, per backend (a skipped backend has no rows)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for backend in backends:
        if backend.skipped is not None:
            continue
        title = BACKENDS[backend.key]
        rows: list[dict[str, Any]] = []
        done = 0
        for n in sizes:
            step = n - done
            row: dict[str, Any] = {"events": n}
            with phase(f"S1. {title}: append {done:,} -> {n:,} (1,000 per append)", step) as adv:
                (row["append"],), _ = run_children(
                    [backend.spec("append", first_call=done // BATCH, calls=step // BATCH)], adv
                )
            done = n
            row["store_mib"] = row["append"].pop("store_mib")
            with phase(f"S2. {title}: read_all of {n:,}", n) as adv:
                (row["read_all"],), _ = run_children([backend.spec("read_all", events=n)], adv)
            with phase(f"S3. {title}: subscription catch-up from 0, {n:,}", n) as adv:
                (row["subscribe"],), _ = run_children([backend.spec("subscribe", events=n)], adv)
            if n <= projection_max:
                row["projections"] = _projections(backend, n, title, phase)
            else:
                row["projections"] = {
                    "skipped": f"over --scale-projection-max ({projection_max:,} events)"
                }
            rows.append(row)
        out[backend.key] = rows
    return out


def _projections(backend: Backend, n: int, title: str, phase: PhaseOf) -> dict[str, Any]:
    """S4: two projections caught up by one worker process, then by two."""
    figures: dict[str, Any] = {}
    for workers in (1, 2):
        names = [
            ("balances", f"scale_balances_{n}_w{workers}"),
            ("deposits", f"scale_deposits_{n}_w{workers}"),
        ]
        groups = [names] if workers == 1 else [[names[0]], [names[1]]]
        label = "1 worker process" if workers == 1 else "2 worker processes, one each by lease"
        with phase(f"S4. {title}: 2 projections over {n:,}, {label}", 2 * n) as adv:
            results, wall = run_children(
                [backend.spec("project", projections=group) for group in groups], adv
            )
        figures[f"workers_{workers}"] = {
            "wall_seconds": round(wall, 3),
            "rate": round(n / wall, 1),  # both projections at the head
            "projection_events_per_s": round(2 * n / wall, 1),
            "rss_peak_mib": max(r["rss_peak_mib"] for r in results),
            "workers": results,
        }
    figures["speedup"] = round(
        figures["workers_1"]["wall_seconds"] / figures["workers_2"]["wall_seconds"], 3
    )
    return figures


def postgres_settings(dsn: str) -> dict[str, str]:
    """The server settings that say where the PostgreSQL curve bends."""
    import asyncpg

    async def fetch() -> dict[str, str]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return {
                name: str(await conn.fetchval(f"SHOW {name}"))
                for name in ("shared_buffers", "effective_cache_size", "max_wal_size")
            }
        finally:
            await conn.close()

    return asyncio.run(fetch())


def memory_mib() -> int | None:
    """This machine's RAM (the page cache's ceiling)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError):
        return None


METHOD = (
    "Per backend, the store grows through the sizes (never rebuilt). S1 append: the step's "
    "events in appends of 1,000 events over 1,000 streams (call k to stream k % 1000), one "
    "transaction each, the events built outside the clock; rate = the step's events / time in "
    "store.append. S2 read_all: store.read_all() over the whole store, every record decoded. "
    "S3 subscription catch-up: store.subscribe(0) until it yields the head, decoded. S4: two "
    "projections (one document per stream each) from 0 to the head with "
    "ProjectionRunner(batch_size=1000, lease=30): workers_1 = one worker process running both, "
    "workers_2 = two worker processes, one projection each (a lease is per projection, so one "
    "projection cannot be split across processes today); rate = head / wall time from the go "
    "signal to both projections at the head. Every measurement is a fresh child process; "
    "rss_peak_mib is its getrusage ru_maxrss, rss_start_mib the same before the work (after "
    "imports and opening the store), rss_end_mib the resident set just after the work, the store "
    "closed (/proc/self/statm); where rss_peak_mib = rss_start_mib the work stayed below the "
    "peak reached while importing and opening. store_mib: the SQLite file and its WAL, or the "
    "PostgreSQL schema's tables with indexes and TOAST, after the append step. One round per "
    "figure."
)


# -- reporting -----------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def table(results: dict[str, list[dict[str, Any]]], skipped: dict[str, str], title: str) -> Any:
    from rich.table import Table

    out = Table(
        title=title,
        title_justify="left",
        caption=(
            "Rates in events/s. append: the step's events (1,000 per append); read_all and "
            "subscribe: the whole store from 0, decoded; projections: 2 projections to the "
            "head, 1 worker process running both vs 2 worker processes (one projection each, "
            "by lease; one projection cannot be split today), head / wall time. RSS: peak of "
            "the child process doing append / read_all / subscribe, MiB."
        ),
        caption_justify="left",
    )
    for name, justify in (
        ("backend", "left"),
        ("events", "right"),
        ("append", "right"),
        ("read_all", "right"),
        ("subscribe", "right"),
        ("proj. 1 worker", "right"),
        ("proj. 2 workers", "right"),
        ("peak RSS MiB", "right"),
        ("store MiB", "right"),
    ):
        out.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for key, rows in results.items():
        for row in rows:
            projections = row["projections"]
            if "skipped" in projections:
                one = two = "[yellow]skipped[/]"
            else:
                one = _rate(projections["workers_1"]["rate"])
                two = f"{_rate(projections['workers_2']['rate'])} ({projections['speedup']:.2f}x)"
            out.add_row(
                BACKENDS[key],
                f"{row['events']:,}",
                _rate(row["append"]["rate"]),
                _rate(row["read_all"]["rate"]),
                _rate(row["subscribe"]["rate"]),
                one,
                two,
                " / ".join(
                    f"{row[op]['rss_peak_mib']:.0f}" for op in ("append", "read_all", "subscribe")
                ),
                f"{row['store_mib']:,.1f}",
            )
    for key in skipped:  # the reason is printed below the table
        out.add_row(BACKENDS[key], "[yellow]skipped[/]", *["-"] * 7)
    return out


def plot(results: dict[str, list[dict[str, Any]]], path: str, title: str) -> None:
    """Rates per backend against the log's size (log-log), and peak RSS beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"sqlite": "tab:blue", "postgres": "tab:orange"}
    series = (
        ("append", "-", "o", lambda r: r["append"]["rate"]),
        ("read_all", "--", "s", lambda r: r["read_all"]["rate"]),
        ("subscribe catch-up", ":", "^", lambda r: r["subscribe"]["rate"]),
        ("2 projections, 1 worker", "-.", "v", lambda r: r["projections"]["workers_1"]["rate"]),
        ("2 projections, 2 workers", "-.", "D", lambda r: r["projections"]["workers_2"]["rate"]),
    )
    figure, (rates, memory) = plt.subplots(1, 2, figsize=(13, 5.2))
    for key, rows in results.items():
        for label, style, marker, value in series:
            measured = (
                [r for r in rows if "skipped" not in r["projections"]]
                if "projections" in label
                else rows
            )
            points = [(r["events"], value(r)) for r in measured]
            if points:
                xs, ys = zip(*points, strict=True)
                rates.plot(
                    xs,
                    ys,
                    style,
                    marker=marker,
                    color=colours[key],
                    label=f"{BACKENDS[key]} {label}",
                )
        for op, style, marker in (
            ("append", "-", "o"),
            ("read_all", "--", "s"),
            ("subscribe", ":", "^"),
        ):
            xs = [r["events"] for r in rows]
            memory.plot(
                xs,
                [r[op]["rss_peak_mib"] for r in rows],
                style,
                marker=marker,
                color=colours[key],
                label=f"{BACKENDS[key]} {op}",
            )
    rates.set(
        xscale="log", yscale="log", xlabel="events in the store", ylabel="events/s", title="rate"
    )
    memory.set(
        xscale="log",
        xlabel="events in the store",
        ylabel="MiB",
        title="peak RSS of the process doing it",
    )
    memory.set_ylim(bottom=0)
    for axes in (rates, memory):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "child":
        raise SystemExit("usage: scale.py child JSON (run.py --scale starts these)")
    child(json.loads(sys.argv[2]))
