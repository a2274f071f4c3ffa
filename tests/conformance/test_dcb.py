"""Dynamic consistency boundaries, run against every store (`store` is parametrised by URL).

Tags stored and read back, query reads (by type, by tags, items OR-ed, `after` exclusive),
append conditions (refused with the conflicting event named, nothing stored, combined with
expected versions, idempotent retries), the race for one user name between tasks and
between processes, and hypothesis-driven concurrent decisions checked against the
sequential history they must be equivalent to (no write skew).
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from typing import Annotated, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tidings
from tests.events import CourseDefined, Note, StudentSubscribed, UserRegistered
from tidings import (
    NO_STREAM,
    AppendCondition,
    AppendConditionFailed,
    Event,
    EventDefinitionError,
    InvalidEvents,
    Personal,
    Query,
    QueryItem,
    WrongExpectedVersion,
)


async def collect(iterator: Any) -> list[Any]:
    return [item async for item in iterator]


def positions(records: list[Any]) -> list[int]:
    return [r.position for r in records]


# -- tags --------------------------------------------------------------------------------


async def test_tags_are_stored_and_read_back_in_declared_order(store: tidings.EventStore) -> None:
    await store.append("course-c1", [CourseDefined(course="c1", capacity=10)])
    await store.append("student-7", [StudentSubscribed(course="c1", student="7")])
    await store.append("notes", [Note(text="untagged")])
    log = await collect(store.read_all())
    assert [r.tags for r in log] == [("course:c1",), ("course:c1", "student:7"), ()]
    streamed = await collect(store.read_stream("student-7"))
    assert streamed[0].tags == ("course:c1", "student:7")


class Transferred(Event, type="test.dcb.transferred"):
    source: str
    target: str
    amount: int

    def event_tags(self) -> tuple[str, ...]:  # computed, not templated
        return (f"account:{self.source}", f"account:{self.target}")


async def test_an_event_may_compute_its_tags(store: tidings.EventStore) -> None:
    await store.append("transfer-1", [Transferred(source="a", target="b", amount=5)])
    [record] = await collect(store.read_all(query=Query(QueryItem(tags=["account:b"]))))
    assert record.tags == ("account:a", "account:b")


def test_a_template_naming_a_missing_field_fails_at_class_definition() -> None:
    with pytest.raises(EventDefinitionError, match="'coarse'"):

        class Broken(Event, type="test.dcb.broken", tags=("course:{coarse}",)):
            course: str

    with pytest.raises(EventDefinitionError, match="personal"):

        class Leaky(Event, type="test.dcb.leaky", tags=("email:{email}",)):
            user: str
            email: Annotated[str, Personal(subject="user")]


class Tagged(Event, type="test.dcb.tagged"):
    given: tuple[str, ...]

    def event_tags(self) -> tuple[str, ...]:
        return self.given


@pytest.mark.parametrize(
    ("tag", "problem"),
    [("", "is empty"), ("x" * 256, "over the limit"), ("a\nb", "control"), ("a\x00", "control")],
)
async def test_a_bad_tag_is_refused_and_nothing_is_stored(
    store: tidings.EventStore, tag: str, problem: str
) -> None:
    good = Tagged(given=("fine",))
    with pytest.raises(InvalidEvents, match=problem) as caught:
        await store.append("s", [good, Tagged(given=("ok", tag))])
    assert "events[1]" in str(caught.value)
    assert await store.last_position() == 0
    await store.append("s", [good])  # the store goes on
    assert [r.tags for r in await collect(store.read_all())] == [("fine",)]


# -- query reads -------------------------------------------------------------------------


async def courses(store: tidings.EventStore) -> None:
    await store.append("course-c1", [CourseDefined(course="c1", capacity=2)])  # 1
    await store.append("course-c2", [CourseDefined(course="c2", capacity=5)])  # 2
    await store.append("s-7", [StudentSubscribed(course="c1", student="7")])  # 3
    await store.append("s-8", [StudentSubscribed(course="c2", student="8")])  # 4
    await store.append("s-7", [StudentSubscribed(course="c2", student="7")])  # 5
    await store.append("users", [UserRegistered(username="ada")])  # 6
    await store.append("notes", [Note(text="n")])  # 7


async def test_query_items_match_by_type_and_every_tag(store: tidings.EventStore) -> None:
    await courses(store)

    async def read(*items: QueryItem, after: int = 0) -> list[int]:
        return positions(await collect(store.read_all(after, query=Query(*items))))

    assert await read(QueryItem(tags=["course:c1"])) == [1, 3]
    assert await read(QueryItem(types=[StudentSubscribed], tags=["student:7"])) == [3, 5]
    assert await read(QueryItem(tags=["course:c2", "student:7"])) == [5]
    assert await read(QueryItem(types=["test.course.defined"])) == [1, 2]
    assert await read(QueryItem(types=[CourseDefined], tags=["student:7"])) == []
    assert await read(QueryItem(types=[Note, UserRegistered])) == [6, 7]
    # items are OR-ed, each event once, in position order
    both = (QueryItem(tags=["student:7"]), QueryItem(types=[CourseDefined], tags=["course:c1"]))
    assert await read(*both) == [1, 3, 5]
    assert await read(*both, after=3) == [5]  # `after` is exclusive
    assert await read() == [1, 2, 3, 4, 5, 6, 7]  # no items: everything
    assert await read(QueryItem()) == [1, 2, 3, 4, 5, 6, 7]
    assert await read(QueryItem(tags=["course:nope"])) == []


async def test_query_reads_page_and_combine_with_types(store: tidings.EventStore) -> None:
    for n in range(25):
        await store.append(f"s-{n}", [StudentSubscribed(course="big", student=str(n))])
        await store.append("notes", [Note(text=str(n))])
    q = Query(QueryItem(tags=["course:big"]))
    small = tidings.open_store(store.url, batch_size=4)  # type: ignore[attr-defined]
    if store.url.startswith("memory"):  # type: ignore[attr-defined]
        small = store
    async with small if small is not store else _same(store):
        found = await collect(small.read_all(query=q))
        assert positions(found) == list(range(1, 50, 2))
        assert positions(await collect(small.read_all(query=q, limit=3))) == [1, 3, 5]
        assert await collect(small.read_all(query=q, types=[Note])) == []  # both must hold


class _same:
    def __init__(self, store: Any) -> None:
        self.store = store

    async def __aenter__(self) -> Any:
        return self.store

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_subscribe_with_a_query_gets_only_matching_events(store: tidings.EventStore) -> None:
    q = Query(QueryItem(tags=["username:ada"]))
    got: list[Any] = []

    async def follow() -> None:
        async for record in store.subscribe(query=q):
            got.append(record)

    task = asyncio.create_task(follow())
    try:
        await store.append("users", [UserRegistered(username="bob")])
        await store.append("users", [UserRegistered(username="ada")])
        await store.append("notes", [Note(text="x")])
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert [r.event for r in got] == [UserRegistered(username="ada")]
    finally:
        task.cancel()


# -- append conditions -------------------------------------------------------------------


async def test_a_failed_condition_names_the_first_conflict_and_stores_nothing(
    store: tidings.EventStore,
) -> None:
    await courses(store)
    q = Query(QueryItem(types=[CourseDefined, StudentSubscribed], tags=["course:c2"]))
    with pytest.raises(AppendConditionFailed) as caught:
        await store.append(
            "s-9", [StudentSubscribed(course="c2", student="9")], condition=AppendCondition(q, 3)
        )
    error = caught.value
    assert (error.position, error.type, error.after, error.stream_id) == (
        4,
        "test.course.subscribed",
        3,
        "s-9",
    )
    assert "position 4" in str(error) and "test.course.subscribed" in str(error)
    assert isinstance(error, tidings.TidingsError)
    assert await store.last_position() == 7
    assert await store.stream_version("s-9") == 0
    # after the newest matching event the condition holds
    done = await store.append(
        "s-9", [StudentSubscribed(course="c2", student="9")], condition=AppendCondition(q, 5)
    )
    assert done.position == 8


async def test_after_none_means_no_matching_event_at_all(store: tidings.EventStore) -> None:
    claim = Query(QueryItem(types=[UserRegistered], tags=["username:ada"]))
    await store.append("u-1", [UserRegistered(username="ada")], condition=AppendCondition(claim))
    with pytest.raises(AppendConditionFailed) as caught:
        await store.append(
            "u-2", [UserRegistered(username="ada")], condition=AppendCondition(claim, None)
        )
    assert caught.value.position == 1 and caught.value.after is None
    everything = AppendCondition(Query(), after=1)
    await store.append("notes", [Note(text="a")], condition=everything)
    with pytest.raises(AppendConditionFailed):
        await store.append("notes", [Note(text="b")], condition=everything)


async def test_condition_and_expected_version_must_both_hold(store: tidings.EventStore) -> None:
    q = Query(QueryItem(tags=["username:ada"]))
    await store.append("u", [Note(text="first")])
    with pytest.raises(WrongExpectedVersion):  # the condition holds, the version does not
        await store.append(
            "u", [UserRegistered(username="ada")], NO_STREAM, condition=AppendCondition(q, 1)
        )
    await store.append("x", [UserRegistered(username="ada")])
    with pytest.raises(AppendConditionFailed):  # the version holds, the condition does not
        await store.append(
            "u", [UserRegistered(username="ada")], 1, condition=AppendCondition(q, 1)
        )
    assert await store.stream_version("u") == 1


async def test_a_retried_conditioned_append_returns_the_original_result(
    store: tidings.EventStore,
) -> None:
    q = Query(QueryItem(types=[UserRegistered], tags=["username:ada"]))
    events = [UserRegistered(username="ada")]
    first = await store.append("u-ada", events, condition=AppendCondition(q, None))
    again = await store.append("u-ada", events, condition=AppendCondition(q, None))
    assert again == first
    assert len(await collect(store.read_all())) == 1


def test_conditions_and_queries_refuse_bad_arguments() -> None:
    with pytest.raises(TypeError):
        QueryItem(tags="course:c1")  # a string, not a list of tags
    with pytest.raises(TypeError):
        QueryItem(types=[object])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        Query("course:c1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AppendCondition(QueryItem(tags=["x"]))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AppendCondition(Query(), after=-1)
    assert Query(QueryItem(tags=["a", "b"])) == Query(QueryItem(tags=["b", "a"]))


# -- the race for one user name ------------------------------------------------------------


async def claim(store: tidings.EventStore, username: str, who: str) -> bool:
    """A decision: the name is free if no registration carries its tag."""
    q = Query(QueryItem(types=[UserRegistered], tags=[f"username:{username}"]))
    head = await store.last_position()
    if await collect(store.read_all(query=q)):
        return False
    try:
        await store.append(
            f"user-{who}", [UserRegistered(username=username)], condition=AppendCondition(q, head)
        )
    except AppendConditionFailed:
        return False
    return True


async def test_twenty_tasks_race_for_one_name_and_one_wins(store: tidings.EventStore) -> None:
    won = await asyncio.gather(*(claim(store, "ada", str(n)) for n in range(20)))
    assert sum(won) == 1
    stored = await collect(store.read_all(query=Query(QueryItem(tags=["username:ada"]))))
    assert len(stored) == 1
    # unrelated names all win, concurrently
    won = await asyncio.gather(*(claim(store, f"name-{n}", str(n)) for n in range(20)))
    assert all(won)


_CLAIMER = textwrap.dedent(
    """
    import asyncio, sys
    import tidings
    from tests.conformance.test_dcb import claim

    async def main() -> None:
        async with tidings.open_store(sys.argv[1]) as store:
            await asyncio.sleep(float(sys.argv[3]))
            print("won" if await claim(store, "grace", sys.argv[2]) else "lost")

    asyncio.run(main())
    """
)


async def test_twenty_processes_race_for_one_name_and_one_wins(shared_url: str) -> None:
    store_url = shared_url
    async with tidings.open_store(store_url):
        pass  # the schema exists before the racers start
    racers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CLAIMER,
            store_url,
            str(n),
            "0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for n in range(20)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(r.communicate() for r in racers)), 120)
    outcomes = [out.decode().strip() for out, _ in results]
    errors = [
        err.decode()[-500:] for (_, err), r in zip(results, racers, strict=True) if r.returncode
    ]
    assert not errors, errors
    assert sorted(outcomes).count("won") == 1, outcomes
    async with tidings.open_store(store_url) as store:
        stored = await collect(store.read_all(query=Query(QueryItem(tags=["username:grace"]))))
        assert len(stored) == 1


# -- concurrent decisions against the sequential history ------------------------------------

TAGS = ["k:a", "k:b", "k:c", "k:d"]
decisions = st.lists(
    st.tuples(
        st.lists(st.sampled_from(TAGS), min_size=1, max_size=2, unique=True),  # query's tags
        st.lists(st.sampled_from(TAGS), min_size=0, max_size=2, unique=True),  # event's tags
        st.booleans(),  # whether the query also names the type
    ),
    min_size=2,
    max_size=12,
)


class Fact(Event, type="test.dcb.fact"):
    marks: tuple[str, ...]
    decision: int

    def event_tags(self) -> tuple[str, ...]:
        return self.marks


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=decisions)
async def test_concurrent_decisions_never_write_skew(
    store: tidings.EventStore, plan: list[tuple[list[str], list[str], bool]]
) -> None:
    """Deciders read their query, then append on it, all at once; afterwards the log in
    position order must be a history in which every successful append's condition held
    (no matching event between the position it read up to and its own), and every refused
    one really had a matching event after that position."""
    base = await store.last_position()
    queries = [
        Query(QueryItem(types=[Fact] if typed else None, tags=tags)) for tags, _, typed in plan
    ]
    outcome: dict[int, tuple[int, bool]] = {}

    async def decide(n: int) -> None:
        head = await store.last_position()
        await collect(store.read_all(head, query=queries[n]))  # the decision's read
        await asyncio.sleep(0)
        event = Fact(marks=tuple(plan[n][1]), decision=n)
        try:
            await store.append(f"d-{n}", [event], condition=AppendCondition(queries[n], head))
            outcome[n] = (head, True)
        except AppendConditionFailed:
            outcome[n] = (head, False)

    await asyncio.gather(*(decide(n) for n in range(len(plan))))
    log = [r for r in await collect(store.read_all(base)) if isinstance(r.event, Fact)]
    where = {r.event.decision: r for r in log}
    for n, (head, succeeded) in outcome.items():
        q = queries[n]
        if succeeded:
            mine = where[n].position
            between = [r for r in log if head < r.position < mine and q.matches(r.type, r.tags)]
            assert not between, f"decision {n} appended over {between}"
        else:
            assert n not in where
            assert any(r.position > head and q.matches(r.type, r.tags) for r in log)


# -- the indexes --------------------------------------------------------------------------


async def test_a_tag_read_does_not_scan_the_log(shared_url: str) -> None:
    """With 20,000 events of other tags and 100 of the one read, the query plan of a tag
    read uses the tag index (SQLite: EXPLAIN QUERY PLAN; PostgreSQL: EXPLAIN after ANALYZE)."""
    async with tidings.open_store(shared_url) as store:
        for n in range(20):
            bulk = [Tagged(given=(f"bulk:{i % 500}", f"n:{n}")) for i in range(1000)]
            await store.append(f"bulk-{n}", bulk)
        for n in range(100):
            await store.append(f"u-{n}", [UserRegistered(username="many")])
        q = Query(QueryItem(types=[UserRegistered], tags=["username:many"]))
        found = await collect(store.read_all(query=q))
        assert len(found) == 100
        plan = await _plan(store)
    assert "USING PRIMARY KEY (tag=?" in plan or "tidings_tags_pkey" in plan, plan
    assert "SCAN" not in plan and "Seq Scan" not in plan, plan


async def _plan(store: Any) -> str:
    from tidings.core.query import Selection
    from tidings.store.selecting import Placeholders, selected_positions

    selection = Selection.of(
        Query(QueryItem(types=[UserRegistered], tags=["username:many"])), store.codec.registry
    )
    assert selection is not None
    if store.url.startswith("sqlite"):
        mark = Placeholders(numbered=False)
        after, limit = mark(0), mark(1000)
        sql = selected_positions(selection, mark, after=after, limit=limit)

        def explain(conn: Any) -> str:
            rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", mark.named).fetchall()
            return "\n".join(str(row[-1]) for row in rows)

        return str(await store._run(explain))
    mark = Placeholders(numbered=True)
    after, until, limit = mark(0), mark(2**62), mark(1000)
    sql = selected_positions(
        selection,
        mark,
        after=after,
        until=until,
        limit=limit,
        events=f"{store._s}.tidings_events",
        tags=f"{store._s}.tidings_tags",
    )
    async with store._connection() as conn:
        await conn.execute(f"ANALYZE {store._s}.tidings_events")
        await conn.execute(f"ANALYZE {store._s}.tidings_tags")
        rows = await conn.fetch(f"EXPLAIN {sql}", *mark.values)
    return "\n".join(row[0] for row in rows)


async def test_read_query_returns_the_events_and_the_head_to_append_after(
    store: tidings.EventStore,
) -> None:
    await courses(store)
    q = Query(QueryItem(tags=["course:c1"]))
    read = await store.read_query(q)
    assert positions(read.events) == [1, 3]
    assert read.head == 7  # complete up to the newest event, though the last match is 3
    await store.append(
        "s-10",
        [StudentSubscribed(course="c1", student="10")],
        condition=AppendCondition(q, read.head),
    )
    assert positions((await store.read_query(q, after=3)).events) == [8]
    assert (await store.read_query(Query(QueryItem(tags=["none"])))).head == 8
    with pytest.raises(AppendConditionFailed):
        await store.append("s-11", [Note(text="x")], condition=AppendCondition(Query(), read.head))


async def test_a_decision_model_folds_its_projections_and_retries(
    store: tidings.EventStore,
) -> None:
    from tidings import DecisionModel, DecisionProjection

    await courses(store)
    model = DecisionModel(
        capacity=DecisionProjection(0, {CourseDefined: lambda _, e: e.capacity}, ["course:c1"]),
        taken=DecisionProjection(0, {StudentSubscribed: lambda n, e: n + 1}, ["course:c1"]),
    )
    decision = await model.read(store)
    assert (decision.state.capacity, decision.state["taken"], decision.seen) == (2, 1, 2)
    assert decision.condition == AppendCondition(model.query, after=7)

    calls = 0

    async def decide(state: Any) -> list[Event]:
        nonlocal calls
        calls += 1
        if calls == 1:  # someone else takes the last seat meanwhile: a conflict, decide again
            await store.append("s-x", [StudentSubscribed(course="c1", student="x")])
        if state.taken >= state.capacity:
            return []
        return [StudentSubscribed(course="c1", student="y")]

    assert await model.decide(store, "s-y", decide) is None  # the course is full by then
    assert calls == 2
    assert await store.stream_version("s-y") == 0
