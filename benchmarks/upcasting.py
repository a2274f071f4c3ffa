"""Scenario 19: reading events stored as v1 and upcast to v3, against reading v3 events.

Two SQLite files with the same number of events of the same account deposits, built untimed
through tidings in appends of 1,000: one written by yesterday's code (`bench.deposited` v1:
`account`, `amount` in euros), one by today's (v3: `account`, `amount_cents`, `currency`).
Both are read with today's code (`read_all()`, every event's `record.event` touched), so the
v1 file goes through two upcasters per event (v1 -> v2: euros to cents; v2 -> v3: the currency,
from the event's metadata or "EUR") and pydantic validates the v3 result; the v3 file is
validated straight from its stored JSON. After a warm-up read of a tenth; the sides alternate
which goes first; best round each.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from sqlite_store import Measured, _fresh, _tidings_read, _url
from tidings import Event, JSONCodec, Metadata, TypeRegistry, open_store, upcaster

Advance = Callable[[int], None]

YESTERDAY = TypeRegistry()
TODAY = TypeRegistry()


class DepositedV1(Event, type="bench.deposited", version=1, registry=YESTERDAY):
    account: str
    amount: int


class Deposited(Event, type="bench.deposited", version=3, registry=TODAY):
    account: str
    amount_cents: int
    currency: str


@upcaster("bench.deposited", from_version=1, registry=TODAY)
def _to_cents(data: dict[str, Any]) -> dict[str, Any]:
    return {"account": data["account"], "amount_cents": data["amount"] * 100}


@upcaster("bench.deposited", from_version=2, registry=TODAY)
def _currency(data: dict[str, Any], metadata: Metadata) -> dict[str, Any]:
    return {**data, "currency": metadata.headers.get("currency", "EUR")}


def populate(directory: str, events: int, advance: Advance) -> tuple[str, str]:
    """The v1 file and the v3 file, `events` each (untimed)."""
    v1 = _fresh(directory, "s19-v1.db")
    v3 = _fresh(directory, "s19-v3.db")
    asyncio.run(_fill(v1, YESTERDAY, events, advance, old=True))
    asyncio.run(_fill(v3, TODAY, events, advance, old=False))
    return v1, v3


async def _fill(
    path: str, registry: TypeRegistry, events: int, advance: Advance, old: bool
) -> None:
    async with open_store(_url(path), codec=JSONCodec(registry)) as store:
        for start in range(0, events, 1000):
            size = min(1000, events - start)
            batch = [_event(start + i, old) for i in range(size)]
            await store.append(f"account-{start // 1000}", batch)
            advance(size)


def _event(n: int, old: bool) -> Event:
    account = f"acct-{n % 500}"
    if old:
        return DepositedV1(account=account, amount=n)
    return Deposited(account=account, amount_cents=n * 100, currency="EUR")


async def _first_event(path: str) -> Event:
    async with open_store(_url(path) + "?create=false", codec=JSONCodec(TODAY)) as store:
        async for record in store.read_all(limit=1):
            return record.event
    raise SystemExit(f"{path} holds no events")


def measure(v1: str, v3: str, events: int, rounds: int, advance: Advance) -> Measured:
    """tidings = the v1 file upcast to v3; raw = the v3 file (the baseline)."""
    warm = min(50_000, max(1, events // 10))
    step = max(1, events // 100)
    measured = Measured(
        info={
            "events": events,
            "warm_up_events": warm,
            "upcasters_per_event": 2,
            "file_bytes": {"v1": os.path.getsize(v1), "v3": os.path.getsize(v3)},
        }
    )
    for path in (v1, v3):  # both read as today's v3 class
        if not isinstance(asyncio.run(_first_event(path)), Deposited):
            raise SystemExit(f"{path} does not read as Deposited v3")
    for round_ in range(rounds):
        sides: list[tuple[str, str]] = [("tidings", v1), ("raw", v3)]
        for side, path in sides if round_ % 2 == 0 else list(reversed(sides)):
            rate, count = asyncio.run(_tidings_read(path, warm, advance, step, JSONCodec(TODAY)))
            if count != events:
                raise SystemExit(f"{side} read {count} events, expected {events}")
            getattr(measured, side).append(rate)
    return measured
