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


# Dynamic consistency boundaries: events carrying tags (the DCB specification's examples).


class CourseDefined(Event, type="test.course.defined", tags=("course:{course}",)):
    course: str
    capacity: int


class StudentSubscribed(
    Event, type="test.course.subscribed", tags=("course:{course}", "student:{student}")
):
    course: str
    student: str


class UserRegistered(Event, type="test.user.registered", tags=("username:{username}",)):
    username: str
