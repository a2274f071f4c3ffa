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
