"""The dead-letter record every adapter stores: `DeadLetter.to_dict` and `from_dict`."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tidings.brokers import DeadLetter, Message


@pytest.mark.parametrize(
    "data", [b'{"n":1}', "caf\u00e9 \u2603".encode(), b"\xff\xfe not utf-8 \x00"]
)
def test_a_dead_letter_survives_its_json_record(data: bytes) -> None:
    message = Message(
        "orders",
        {"specversion": "1.0", "id": "x-1", "type": "t.x", "tenant": "acme corp"},
        data,
        key="k-1",
        headers={"content-type": "application/json"},
    )
    dead = DeadLetter(
        "d-1", "orders", "email", "boom", 3, datetime(2026, 1, 2, tzinfo=UTC), message
    )
    record = json.loads(json.dumps(dead.to_dict()))  # as an adapter stores and reads it
    assert ("data" in record) == (data != b"\xff\xfe not utf-8 \x00")
    assert DeadLetter.from_dict(record) == dead


def test_a_dead_letter_within_a_limit_is_whole_and_one_over_it_is_cut_to_fit() -> None:
    quoted = '"\\' * 150_000  # 300 KB of data that doubles in size as JSON
    message = Message(
        "orders",
        {"specversion": "1.0", "id": "x-1", "type": "t.x", "big": "a" * 200_000},
        quoted.encode(),
        key="k-1",
        headers={f"h{n}": "v" * 1000 for n in range(100)},
    )
    dead = DeadLetter(
        "d-1", "orders", "email", "boom", 3, datetime(2026, 1, 2, tzinfo=UTC), message
    )
    whole = dead.to_json()
    assert DeadLetter.from_dict(json.loads(dead.to_json(len(whole), limit_name="x"))) == dead

    body = dead.to_json(100_000, limit_name="the test's limit")
    assert len(body) <= 100_000 < len(whole)
    kept = DeadLetter.from_dict(json.loads(body))  # still a readable dead letter
    assert (kept.id, kept.topic, kept.group, kept.attempts) == ("d-1", "orders", "email", 3)
    assert kept.error.startswith("boom [cut from ")
    assert "to fit the test's limit of 100,000]" in kept.error
    assert quoted.startswith(kept.message.data.decode())
    assert kept.message.attributes["id"] == "x-1"
