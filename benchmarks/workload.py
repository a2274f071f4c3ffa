"""The benchmark's event type and the inputs both sides store.

Every event is built once, before any timing, and handed to both sides: tidings gets the
`Deposited` instance, raw sqlite3 gets the same id (16 bytes) and the same field dict. Turning
those into stored rows (JSON encoding, ids, versions) is inside the timed part on both sides.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from tidings import Event


class Deposited(Event, type="bench.account.deposited"):
    account: str
    amount: int


EVENT_TYPE = "bench.account.deposited"
SCHEMA_VERSION = 1
JSON_SEPARATORS = (",", ":")  # what pydantic writes, so both sides store the same text


@dataclass(frozen=True, slots=True)
class Item:
    """One event, as each side receives it."""

    event: Deposited
    id: bytes
    data: dict[str, Any]


def make_items(count: int, seed: int = 0) -> list[Item]:
    """`count` events with realistic small data; the id is fixed now, so both sides share it."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        data = {"account": f"acc-{rng.randrange(100_000):06d}", "amount": rng.randrange(1, 50_000)}
        event = Deposited(**data)
        items.append(Item(event, event.event_id.bytes, data))
    return items


def encode(data: dict[str, Any]) -> str:
    """The raw side's encoding: the same text tidings stores for the same event."""
    return json.dumps(data, separators=JSON_SEPARATORS)


def check_same_encoding() -> None:
    """Fail loudly if the two sides would not store byte-identical data."""
    item = make_items(1, seed=42)[0]
    ours = item.event.__pydantic_serializer__.to_json(item.event).decode()
    if ours != encode(item.data):
        raise SystemExit(f"encodings differ: tidings {ours!r} vs raw {encode(item.data)!r}")
