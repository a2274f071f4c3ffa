"""The crash test's processes, and the launcher that forks them so they restart in a blink.

    python -m tests.reliability.crash_parts launcher LOGDIR

The launcher imports tidings and the broker and database drivers once, then reads commands
from stdin, one JSON document a line, and answers each on stdout:

    {"op": "start", "name": N, "role": R, "args": [...]}  ->  {"started": N, "pid": P}
    {"op": "kill", "name": N}      SIGKILL, and reap it   ->  {"killed": N, "status": S}
    {"op": "signal", "name": N, "signal": S}              ->  {"signalled": N, "running": B}

and says `{"exited": N, "status": S}` when a part ends by itself (after a SIGTERM, say). Each
part is a child forked from it: a real process, with its own connections, that the test can
SIGKILL at any moment; only the import of Python and the libraries is saved, so dozens of
kills fit in a minute. A part writes its output to `LOGDIR/NAME.log`, dies with the launcher
(`PR_SET_PDEATHSIG`), and the launcher SIGKILLs what is left when its stdin closes. Being
their parent, the launcher reaps them, so a pid it signals is always its own child.

The parts (roles):

- `tidings ARGS...`: the `tidings` command itself (`relay ...`, `worker --app ...`).
- `writer STORE_URL ACKS RUN SEED RATE`: appends `Moved` batches of 1 to 5 events through a
  `Repository` (expected versions, reload and retry on a clash) from 4 tasks over `STREAMS`
  streams at about RATE events a second until SIGTERM. Batch ids are `RUN.TASK.N`. It
  appends `begin BATCH` to ACKS before an append and `ack BATCH STREAM FIRST LAST` once the
  store acknowledged it. On SIGUSR1 it SIGKILLs itself 0 to 3 ms into its next append (a
  kill from outside rarely lands inside a 1 ms append).
- `consumer BROKER_URL TOPIC INBOX_URL SKIPS`: a `Service` with two groups on TOPIC, each
  handler behind the inbox: every effect is a row of `crash_effects` (keyed by a sequence
  number only, so a second effect of one event shows as a second row), and the `balances`
  group also keeps `crash_balances`, a read model per stream. Each delivery the inbox turns
  away (processed before) is noted in SKIPS. Runs until SIGTERM.

Events live in a private registry (decode with `CODEC`), so their type names never meet
other tests' events. `Ledger` is the projection `tidings worker --app
tests.reliability.crash_parts:Ledger` keeps; `fold` is the same rules as a plain loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import os
import random
import select
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from tidings import (
    Aggregate,
    AggregateNotFound,
    Context,
    Event,
    Inbox,
    JSONCodec,
    Projection,
    RecordedEvent,
    Repository,
    Service,
    SQLiteInbox,
    TypeRegistry,
    WrongExpectedVersion,
    on,
    open_broker,
    open_inbox,
    open_store,
)

REGISTRY = TypeRegistry()
CODEC = JSONCodec(REGISTRY)
STREAMS = 24
WRITER_TASKS = 4
GROUPS = ("effects", "balances")
TOTALS = "$all"
"""The key of the document that folds the whole log (every other key is a stream id)."""


class Moved(Event, type="crash.moved", registry=REGISTRY):
    """One event of an append of `size` events, all carrying the append's `batch` id."""

    batch: str
    index: int
    size: int
    amount: int


class Account(Aggregate, category="crashacct"):
    balance: int = 0

    def move(self, batch: str, amounts: list[int]) -> None:
        for index, amount in enumerate(amounts):
            self.record(Moved(batch=batch, index=index, size=len(amounts), amount=amount))

    @on(Moved)
    def _moved(self, event: Moved) -> None:
        self.balance += event.amount


# -- the projection ------------------------------------------------------------------------


def _chained(previous: str, *parts: object) -> str:
    return hashlib.sha256("|".join(map(str, (previous, *parts))).encode()).hexdigest()[:16]


def step(
    get: Callable[[str], Any], put: Callable[[str, Any], None], record: RecordedEvent[Any]
) -> None:
    """Fold one event into its stream's document and the totals; raise unless it is the
    next event of its stream and comes after every event seen so far (so an event applied
    twice, or skipped, stops the projection instead of going unnoticed)."""
    event = record.event
    assert isinstance(event, Moved)
    stream = get(record.stream_id) or {"count": 0, "sum": 0, "last_version": 0, "hash": ""}
    if record.version != stream["last_version"] + 1:
        raise RuntimeError(
            f"{record.stream_id} version {record.version} at position {record.position} "
            f"after version {stream['last_version']}: an event was applied twice or skipped"
        )
    totals = get(TOTALS) or {"count": 0, "sum": 0, "last_position": 0, "hash": ""}
    if record.position <= totals["last_position"]:
        raise RuntimeError(
            f"position {record.position} after {totals['last_position']}: applied twice"
        )
    put(
        record.stream_id,
        {
            "count": stream["count"] + 1,
            "sum": stream["sum"] + event.amount,
            "last_version": record.version,
            "hash": _chained(stream["hash"], record.version, event.batch, event.amount),
        },
    )
    put(
        TOTALS,
        {
            "count": totals["count"] + 1,
            "sum": totals["sum"] + event.amount,
            "last_position": record.position,
            "hash": _chained(totals["hash"], record.position, record.stream_id, event.amount),
        },
    )


def fold(records: Iterable[RecordedEvent[Any]]) -> dict[str, Any]:
    """The read model `Ledger` should hold after `records`, built without any runner."""
    documents: dict[str, Any] = {}
    for record in records:
        step(documents.get, documents.__setitem__, record)
    return documents


class Ledger(Projection, name="crash_ledger"):
    """Per stream: count, sum, last version and a hash chain; the same over the whole log."""

    @on(Moved)
    def moved(self, event: Moved, record: RecordedEvent[Any]) -> None:
        step(self.view.get, self.view.put, record)


class LedgerReplay(Ledger, name="crash_ledger_replay"):
    """The same projection under another name: the test's clean replay of the store."""


# -- the writer ----------------------------------------------------------------------------


async def write(store_url: str, acks: str, run: int, seed: int, rate: float) -> int:
    stop = asyncio.Event()
    aimed = asyncio.Event()  # SIGUSR1: SIGKILL this process a moment into the next append
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, aimed.set)
    rng = random.Random(seed)
    out = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    written = 0

    def note(line: str) -> None:  # one write(2) each: whole lines, kept if we are killed
        os.write(out, (line + "\n").encode())

    async with open_store(store_url, codec=CODEC, create=False) as store:
        repository = Repository(store, Account, snapshot_every=25)
        print("writing", flush=True)

        async def task(number: int) -> None:
            nonlocal written
            appended = 0
            while not stop.is_set():
                batch = f"{run}.{number}.{appended}"
                appended += 1
                account = rng.randrange(STREAMS)
                amounts = [rng.randint(-500, 1000) for _ in range(rng.randint(1, 5))]
                note(f"begin {batch}")
                while True:  # load, decide, append with the loaded version; again on a clash
                    try:
                        aggregate = await repository.get(account)
                    except AggregateNotFound:
                        aggregate = Account(account)
                    aggregate.move(batch, amounts)
                    if aimed.is_set():  # from another thread, so it lands inside the append
                        aimed.clear()
                        delay = rng.uniform(0.0, 0.003)
                        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
                    try:
                        result = await repository.save(aggregate)
                    except WrongExpectedVersion:
                        continue
                    break
                assert result is not None
                first = result.version - len(amounts) + 1
                note(f"ack {batch} {repository.stream_id(account)} {first} {result.version}")
                written += len(amounts)
                pause = len(amounts) * WRITER_TASKS / rate
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause * rng.uniform(0.5, 1.5)):
                        await stop.wait()

        await asyncio.gather(*(task(n) for n in range(WRITER_TASKS)))
    os.close(out)
    return written


# -- the consumer --------------------------------------------------------------------------

_SQLITE_TABLES = (
    "create table if not exists crash_effects (seq integer primary key autoincrement, "
    "grp text not null, event_id text not null, stream text not null, version int not null, "
    "amount int not null, pid int not null)",
    "create table if not exists crash_balances (stream text primary key, total int not null, "
    "n int not null)",
)
_POSTGRES_TABLES = (
    "create table if not exists crash_effects (seq bigserial primary key, grp text not null, "
    "event_id text not null, stream text not null, version int not null, amount int not null, "
    "pid int not null)",
    "create table if not exists crash_balances (stream text primary key, total bigint not null, "
    "n int not null)",
)


def _noting_skips(inbox: Inbox, path: str) -> None:
    """Make `inbox` write `GROUP EVENT_ID` to `path` for each delivery it turns away."""
    out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    transaction = inbox.transaction

    @contextlib.asynccontextmanager
    async def noting(consumer: str, event_id: str) -> AsyncIterator[Any]:
        async with transaction(consumer, event_id) as db:
            if db is None:
                os.write(out, f"{consumer} {event_id}\n".encode())
            yield db

    inbox.transaction = noting  # type: ignore[method-assign]


async def consume(broker_url: str, topic: str, inbox_url: str, skips: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    pid = os.getpid()
    async with open_broker(broker_url, codec=CODEC) as broker, open_inbox(inbox_url) as inbox:
        _noting_skips(inbox, skips)
        sqlite = isinstance(inbox, SQLiteInbox)
        if isinstance(inbox, SQLiteInbox):
            assert inbox._conn is not None
            for sql in _SQLITE_TABLES:
                inbox._conn.execute(sql)
        else:
            async with inbox._pool.acquire() as conn:  # type: ignore[attr-defined]
                for sql in _POSTGRES_TABLES:
                    await conn.execute(sql)
        service = Service("crash", broker, registry=REGISTRY)

        async def effect(group: str, event: Moved, ctx: Context) -> None:
            record = ctx.delivery.record
            row = (group, str(record.id), record.stream_id, record.version, event.amount, pid)
            if sqlite:
                ctx.db.execute(
                    "insert into crash_effects (grp, event_id, stream, version, amount, pid) "
                    "values (?, ?, ?, ?, ?, ?)",
                    row,
                )
            else:
                await ctx.db.execute(
                    "insert into crash_effects (grp, event_id, stream, version, amount, pid) "
                    "values ($1, $2, $3, $4, $5, $6)",
                    *row,
                )

        @service.handler(topic, group="effects", inbox=inbox)
        async def effects(event: Moved, ctx: Context) -> None:
            await effect("effects", event, ctx)

        @service.handler(topic, group="balances", inbox=inbox)
        async def balances(event: Moved, ctx: Context) -> None:
            await effect("balances", event, ctx)
            stream = ctx.delivery.record.stream_id
            upsert = (
                "insert into crash_balances values ({0}, {1}, 1) on conflict (stream) do update "
                "set total = crash_balances.total + excluded.total, n = crash_balances.n + 1"
            )
            if sqlite:
                ctx.db.execute(upsert.format("?", "?"), (stream, event.amount))
            else:
                await ctx.db.execute(upsert.format("$1", "$2"), stream, event.amount)

        running = asyncio.create_task(service.run())
        stopping = asyncio.create_task(stop.wait())
        print("consuming", flush=True)
        await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        service.stop()
        await running
    print("stopped", flush=True)


# -- the launcher --------------------------------------------------------------------------


def _run_part(role: str, args: list[str]) -> int:
    if role == "tidings":
        from tidings.cli.main import app

        try:
            app(args=args, prog_name="tidings")
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        return 0
    if role == "writer":
        store_url, acks, run, seed, rate = args
        written = asyncio.run(write(store_url, acks, int(run), int(seed), float(rate)))
        print(f"wrote {written}", flush=True)
        return 0
    if role == "consumer":
        asyncio.run(consume(*args))
        return 0
    raise SystemExit(f"unknown role {role!r}")


def _child(logdir: str, name: str, role: str, args: list[str], parent: int) -> None:
    """In the forked child: become the part, never return."""
    code = 70
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the launcher
        if os.getppid() != parent:  # the launcher died before prctl
            os._exit(code)
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(number, signal.SIG_DFL)
        log = os.open(os.path.join(logdir, f"{name}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        print(f"--- {name} pid {os.getpid()}: {role} {' '.join(args)}", flush=True)
        code = _run_part(role, args)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def launch(logdir: str) -> None:
    """Fork parts on request until stdin closes; then SIGKILL and reap what is left."""
    import tidings.cli.main  # noqa: F401  (imported once here, shared by every fork)

    for driver in ("asyncpg", "redis.asyncio", "nats", "aio_pika"):
        with contextlib.suppress(ImportError):
            __import__(driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the test ends us, by closing stdin
    me = os.getpid()
    children: dict[int, str] = {}  # pid -> name, while not reaped
    by_name: dict[str, int] = {}

    def say(**message: Any) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def reaped(pid: int, status: int) -> None:
        name = children.pop(pid)
        if by_name.get(name) == pid:
            del by_name[name]
        say(exited=name, pid=pid, status=os.waitstatus_to_exitcode(status))

    pending = b""
    say(ready=me)
    try:
        while True:
            readable, _, _ = select.select([0], [], [], 0.05)
            while children:
                pid, raw = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                reaped(pid, raw)
            if not readable:
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                command = json.loads(line)
                name = command["name"]
                if command["op"] == "start":
                    if name in by_name:
                        raise RuntimeError(f"{name} is running already")
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        _child(logdir, name, command["role"], command["args"], me)
                    children[pid] = name
                    by_name[name] = pid
                    say(started=name, pid=pid)
                elif command["op"] == "kill":
                    pid = by_name.get(name, 0)
                    status = None
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                        _, raw = os.waitpid(pid, 0)
                        del children[pid], by_name[name]
                        status = os.waitstatus_to_exitcode(raw)
                    say(killed=name, status=status)
                elif command["op"] == "signal":
                    pid = by_name.get(name, 0)
                    if pid:
                        os.kill(pid, command["signal"])
                    say(signalled=name, running=bool(pid))
                else:
                    raise RuntimeError(f"unknown command {command!r}")
    finally:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


if __name__ == "__main__":
    if sys.argv[1:2] != ["launcher"] or len(sys.argv) != 3:
        raise SystemExit(__doc__)
    launch(sys.argv[2])
