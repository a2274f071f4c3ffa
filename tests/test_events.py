"""Event classes: registration, immutability, identity."""

from __future__ import annotations

from uuid import UUID

import pytest
from pydantic import ValidationError

from tests.events import Deposited, Note
from tidings import DuplicateEventType, Event, EventDefinitionError, TypeRegistry, default_registry


def test_declaring_a_class_registers_type_and_version() -> None:
    assert Deposited.__event_type__ == "test.account.deposited"
    assert Deposited.__event_version__ == 1
    assert default_registry.get("test.account.deposited", 1) is Deposited
    assert ("test.account.deposited", 1) in default_registry


def test_version_is_part_of_the_key() -> None:
    registry = TypeRegistry()

    class V1(Event, type="test.versioned", registry=registry):
        amount: int

    class V2(Event, type="test.versioned", version=2, registry=registry):
        amount: int
        currency: str = "EUR"

    assert registry.get("test.versioned", 1) is V1
    assert registry.get("test.versioned", 2) is V2
    assert list(registry) == [V1, V2]


def test_a_second_class_with_the_same_type_and_version_fails_at_definition() -> None:
    registry = TypeRegistry()

    class First(Event, type="test.dup", registry=registry):
        pass

    with pytest.raises(DuplicateEventType) as info:

        class Second(Event, type="test.dup", registry=registry):
            pass

    assert isinstance(info.value, TypeError)
    assert (info.value.type, info.value.version, info.value.existing) == ("test.dup", 1, First)
    assert "First" in str(info.value) and "Second" in str(info.value)
    assert registry.get("test.dup", 1) is First


def test_duplicate_in_the_default_registry_fails_too() -> None:
    with pytest.raises(DuplicateEventType):

        class Again(Event, type="test.account.deposited"):
            amount: int


def test_registries_are_separate() -> None:
    mine = TypeRegistry()

    class Mine(Event, type="test.account.deposited", registry=mine):  # no clash: other registry
        amount: int

    assert mine.get("test.account.deposited", 1) is Mine
    assert default_registry.get("test.account.deposited", 1) is Deposited


@pytest.mark.parametrize("bad", ["", " spaced", "-dash-first", "x" * 256, 3])
def test_bad_type_names_are_refused(bad: object) -> None:
    with pytest.raises(EventDefinitionError):

        class Bad(Event, type=bad, registry=TypeRegistry()):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize("bad", [0, -1, "2", True])
def test_bad_versions_are_refused(bad: object) -> None:
    with pytest.raises(EventDefinitionError):

        class Bad(Event, type="test.bad.version", version=bad, registry=TypeRegistry()):  # type: ignore[arg-type]
            pass


def test_base_classes_without_type_are_abstract() -> None:
    class AccountEvent(Event):
        account: str

    class Closed(AccountEvent, type="test.account.closed", registry=TypeRegistry()):
        reason: str

    class Unregistered(Closed):
        pass

    assert AccountEvent.__event_type__ is None
    assert Closed.__event_type__ == "test.account.closed"
    assert Unregistered.__event_type__ is None  # a subclass never inherits a concrete name


def test_events_are_frozen_and_validated() -> None:
    event = Deposited(amount=5)
    with pytest.raises(ValidationError):
        event.amount = 6  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Deposited(amount="lots")  # type: ignore[arg-type]


def test_event_id_is_a_stable_uuid7_and_not_part_of_equality() -> None:
    a, b = Note(text="same"), Note(text="same")
    assert isinstance(a.event_id, UUID) and a.event_id.version == 7
    assert a.event_id == a.event_id
    assert a.event_id != b.event_id
    assert a == b and hash(a) == hash(b)
    assert a != Deposited(amount=1)
    other = UUID(int=7)
    assert a.with_id(other).event_id == other and a.event_id != other


def test_even_a_same_named_class_cannot_take_a_registered_type() -> None:
    registry = TypeRegistry()

    def declare() -> type[Event]:
        class Same(Event, type="test.same", registry=registry):
            pass

        return Same

    declare()
    with pytest.raises(DuplicateEventType):
        declare()  # same module, same qualified name: still a second class


def test_uuid7_after_fork_does_not_repeat_the_parent() -> None:
    import os

    from tidings.core.ids import uuid7

    uuid7()  # the parent has drawn its pool of random bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its next ids and leave at once
        os.write(write, b"".join(uuid7().bytes for _ in range(8)))
        os._exit(0)
    os.close(write)
    mine = {uuid7().bytes for _ in range(8)}
    os.waitpid(pid, 0)
    data = os.read(read, 4096)
    os.close(read)
    theirs = {data[i : i + 16] for i in range(0, len(data), 16)}
    assert len(theirs) == 8 and not mine & theirs
    assert {u[8:] for u in mine}.isdisjoint(u[8:] for u in theirs)  # fresh random bits
