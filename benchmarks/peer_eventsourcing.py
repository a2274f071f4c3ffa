"""Scenarios 7 and 8: tidings against the `eventsourcing` library (9.5.6), both on SQLite.

The same domain on both sides: an account aggregate, opened, then deposits (tidings' `Account`
from aggregates.py; here an `eventsourcing.domain.Aggregate` with `@event` methods). The same
work, on one file per side, with both files open at once:

- 7. save: each of N accounts is opened and saved, then gets 9 deposits, each saved on its own
  (10 saves, each one durable transaction); saves per second.
- 7b. concurrent saves: the same saves from `clients` concurrent clients, as each library
  serves concurrent requests: tidings with one asyncio task per client on one event loop,
  eventsourcing with one thread per client (its Application is synchronous and thread-safe).
- 8. load: every account loaded by id (10 events each, no snapshots, no cache on either side),
  a few passes; loads per second.

The sides take turns in blocks of accounts (which goes first alternates) so that the drift of
the disk's fsync rate hits both alike; each round uses fresh files, the best round per side is
kept, and both sides' loaded balances are checked.

SQLite settings: `eventsourcing.sqlite` (PERSISTENCE_MODULE="eventsourcing.sqlite",
SQLITE_DBNAME=<file>) sets journal_mode=WAL itself and leaves `synchronous` at SQLite's default,
FULL (checked at run time and recorded); it starts each transaction with a plain (deferred)
BEGIN and has a 5 s lock timeout. tidings runs with journal_mode=WAL and synchronous=FULL (its
default, also passed explicitly). So both sides make every save durable with an fsync of the
WAL at commit.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

from aggregates import Account, amount, bench_store, drop, expected_balance, fresh
from sqlite_store import Measured
from tidings import Repository

try:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate as ESAggregate
    from eventsourcing.domain import event as es_event
except ImportError as exc:  # pragma: no cover - the dev extra installs it
    raise SystemExit(
        "scenarios 7-8 need the eventsourcing library: pip install eventsourcing==9.5.6 "
        '(or pip install -e ".[dev]")'
    ) from exc

Advance = Callable[[int], None]
EVENTSOURCING_VERSION = "9.5.6"


class ESAccount(ESAggregate):
    """The same account in eventsourcing's style: the command methods are the events."""

    @es_event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0

    @es_event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount


class ESBank(Application):  # type: ignore[type-arg]
    name = "BenchBank"


def _es_app(path: str) -> ESBank:
    # eventsourcing merges os.environ into its settings; the explicit env here wins over it.
    return ESBank(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": path})


def _es_pragmas(app: ESBank) -> dict[str, Any]:
    with app.factory.datastore.transaction(commit=False) as cursor:  # type: ignore[attr-defined]
        cursor.execute("PRAGMA synchronous")
        synchronous = cursor.fetchone()[0]
        cursor.execute("PRAGMA journal_mode")
        journal = cursor.fetchone()[0]
    names = {0: "off", 1: "normal", 2: "full", 3: "extra"}
    return {"synchronous": names.get(synchronous, synchronous), "journal_mode": journal}


async def _round(
    directory: str,
    accounts: int,
    deposits: int,
    block: int,
    load_passes: int,
    warm: int,
    advance_save: Advance,
    advance_load: Advance,
) -> tuple[float, float, float, float, dict[str, Any]]:
    tidings_path = fresh(directory, "s7-tidings.db")
    es_path = fresh(directory, "s7-eventsourcing.db")
    saves_each = 1 + deposits
    balance = expected_balance(deposits)
    app = _es_app(es_path)
    try:
        pragmas = _es_pragmas(app)
        if pragmas != {"synchronous": "full", "journal_mode": "wal"}:
            raise SystemExit(f"eventsourcing's SQLite settings changed: {pragmas}")
        async with bench_store(tidings_path, synchronous="full") as store:
            repo = Repository(store, Account)
            ours: list[str] = []
            theirs: list[Any] = []

            async def tidings_saves(lo: int, hi: int) -> float:
                start = time.perf_counter()
                for i in range(lo, hi):
                    account = Account.open(str(i), f"owner-{i}")
                    await repo.save(account)
                    for k in range(deposits):
                        account.deposit(amount(k))
                        await repo.save(account)
                    ours.append(str(i))
                return time.perf_counter() - start

            def es_saves(lo: int, hi: int) -> float:
                start = time.perf_counter()
                for i in range(lo, hi):
                    account = ESAccount(owner=f"owner-{i}")
                    app.save(account)
                    for k in range(deposits):
                        account.deposit(amount(k))
                        app.save(account)
                    theirs.append(account.id)
                return time.perf_counter() - start

            async def tidings_loads(lo: int, hi: int) -> float:
                get = repo.get
                start = time.perf_counter()
                for account_id in ours[lo:hi]:
                    if (await get(account_id)).balance != balance:
                        raise SystemExit(f"scenario 8: tidings loaded a wrong {account_id}")
                return time.perf_counter() - start

            def es_loads(lo: int, hi: int) -> float:
                get = app.repository.get
                start = time.perf_counter()
                for account_id in theirs[lo:hi]:
                    if get(account_id).balance != balance:
                        raise SystemExit(f"scenario 8: eventsourcing loaded a wrong {account_id}")
                return time.perf_counter() - start

            # Warm-up: a few accounts each, saved and loaded, untimed.
            await tidings_saves(0, warm)
            es_saves(0, warm)
            await tidings_loads(0, warm)
            es_loads(0, warm)
            gc.collect()

            spent = {"tidings": 0.0, "eventsourcing": 0.0}
            for number, lo in enumerate(range(warm, warm + accounts, block)):
                hi = min(lo + block, warm + accounts)
                if number % 2 == 0:
                    spent["tidings"] += await tidings_saves(lo, hi)
                    spent["eventsourcing"] += es_saves(lo, hi)
                else:
                    spent["eventsourcing"] += es_saves(lo, hi)
                    spent["tidings"] += await tidings_saves(lo, hi)
                advance_save(2 * (hi - lo) * saves_each)
            saves = accounts * saves_each
            save_rates = (saves / spent["tidings"], saves / spent["eventsourcing"])

            gc.collect()
            spent = {"tidings": 0.0, "eventsourcing": 0.0}
            number = 0
            for _ in range(load_passes):
                for lo in range(warm, warm + accounts, block):
                    hi = min(lo + block, warm + accounts)
                    if number % 2 == 0:
                        spent["tidings"] += await tidings_loads(lo, hi)
                        spent["eventsourcing"] += es_loads(lo, hi)
                    else:
                        spent["eventsourcing"] += es_loads(lo, hi)
                        spent["tidings"] += await tidings_loads(lo, hi)
                    number += 1
                    advance_load(2 * (hi - lo))
            loads = accounts * load_passes
            load_rates = (loads / spent["tidings"], loads / spent["eventsourcing"])
    finally:
        app.close()
    drop(tidings_path)
    drop(es_path)
    return (*save_rates, *load_rates, pragmas)


def versus_eventsourcing(
    directory: str,
    accounts: int,
    rounds: int,
    load_passes: int,
    advance_save: Advance,
    advance_load: Advance,
    deposits: int = 9,
    block: int = 10,
    warm: int = 5,
) -> tuple[Measured, Measured]:
    """Scenarios 7 and 8: (saves/s, loads/s) per round for each side; `raw` is eventsourcing."""
    version = metadata.version("eventsourcing")
    if version != EVENTSOURCING_VERSION:
        raise SystemExit(
            f"scenarios 7-8 expect eventsourcing {EVENTSOURCING_VERSION}, not {version}"
        )
    common: dict[str, Any] = {
        "eventsourcing_version": version,
        "accounts": accounts,
        "events_per_account": 1 + deposits,
        "accounts_per_block": block,
        "warm_up_accounts": warm,
        "tidings_sqlite": {"synchronous": "full", "journal_mode": "wal"},
        "rounds": rounds,
    }
    save = Measured(info={**common, "saves_per_side": accounts * (1 + deposits)})
    load = Measured(info={**common, "load_passes": load_passes, "snapshots": "none, no cache"})
    for _ in range(rounds):
        t_save, es_save, t_load, es_load, pragmas = asyncio.run(
            _round(
                directory,
                accounts,
                deposits,
                block,
                load_passes,
                warm,
                advance_save,
                advance_load,
            )
        )
        save.tidings.append(t_save)
        save.raw.append(es_save)
        load.tidings.append(t_load)
        load.raw.append(es_load)
        save.info["eventsourcing_sqlite"] = load.info["eventsourcing_sqlite"] = pragmas
    return save, load


async def _tidings_concurrent(path: str, slices: list[range], deposits: int) -> float:
    async with bench_store(path, synchronous="full") as store:
        repo = Repository(store, Account)

        async def client(ids: range) -> None:
            for i in ids:
                account = Account.open(str(i), f"owner-{i}")
                await repo.save(account)
                for k in range(deposits):
                    account.deposit(amount(k))
                    await repo.save(account)

        start = time.perf_counter()
        await asyncio.gather(*(client(ids) for ids in slices))
        spent = time.perf_counter() - start
        balance = expected_balance(deposits)
        for ids in slices:
            for i in ids:
                if (await repo.get(str(i))).balance != balance:
                    raise SystemExit(f"scenario 7b: tidings saved a wrong account {i}")
    return spent


def _es_concurrent(path: str, slices: list[range], deposits: int) -> float:
    app = _es_app(path)
    ids: list[Any] = []
    try:

        def client(numbers: range) -> None:
            for i in numbers:
                account = ESAccount(owner=f"owner-{i}")
                app.save(account)
                for k in range(deposits):
                    account.deposit(amount(k))
                    app.save(account)
                ids.append(account.id)

        with ThreadPoolExecutor(len(slices)) as pool:
            start = time.perf_counter()
            for future in [pool.submit(client, numbers) for numbers in slices]:
                future.result()
            spent = time.perf_counter() - start
        balance = expected_balance(deposits)
        for account_id in ids:
            if app.repository.get(account_id).balance != balance:
                raise SystemExit("scenario 7b: eventsourcing saved a wrong account")
    finally:
        app.close()
    return spent


def concurrent_saves(
    directory: str,
    accounts: int,
    clients: int,
    rounds: int,
    advance: Advance,
    deposits: int = 9,
) -> Measured:
    """Scenario 7b: saves/s with `clients` concurrent clients per side; `raw` is eventsourcing."""
    per = max(1, accounts // clients)
    slices = [range(c * per, (c + 1) * per) for c in range(clients)]
    saves = clients * per * (1 + deposits)
    measured = Measured(
        info={
            "clients": clients,
            "accounts": clients * per,
            "saves_per_side": saves,
            "tidings": "one asyncio task per client, one event loop",
            "eventsourcing": "one thread per client, one Application",
            "rounds": rounds,
        }
    )
    for number in range(rounds):
        tidings_path = fresh(directory, "s7b-tidings.db")
        es_path = fresh(directory, "s7b-eventsourcing.db")
        if number % 2 == 0:
            ours = asyncio.run(_tidings_concurrent(tidings_path, slices, deposits))
            advance(saves)
            theirs = _es_concurrent(es_path, slices, deposits)
        else:
            theirs = _es_concurrent(es_path, slices, deposits)
            advance(saves)
            ours = asyncio.run(_tidings_concurrent(tidings_path, slices, deposits))
        advance(saves)
        measured.tidings.append(saves / ours)
        measured.raw.append(saves / theirs)
        drop(tidings_path)
        drop(es_path)
    return measured
