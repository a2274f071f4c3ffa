"""Event classes the tests share (type names are prefixed `test.` to stay out of users' way)."""

from __future__ import annotations

from tidings import Event


class Opened(Event, type="test.account.opened"):
    owner: str


class Deposited(Event, type="test.account.deposited"):
    amount: int


class Withdrew(Event, type="test.account.withdrew"):
    amount: int


class Note(Event, type="test.note"):
    text: str
