"""What only the SQLite store has: a file, other processes, group commit, its URL."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tidings
from tests.events import Deposited, Note
from tidings import (
    ConfigurationError,
    EventDecodeError,
    Query,
    QueryItem,
    StoreError,
    StoreNotFound,
)
from tidings.core.ids import uuid_from_bytes
from tidings.store.sqlite import SQLiteEventStore, _from_micros, _mapped_errors

ROOT = Path(__file__).resolve().parents[2]


def url(path: Path) -> str:
    return f"sqlite:///{path}"


async def test_events_survive_reopening(tmp_path: Path) -> None:
    async with tidings.open_store(url(tmp_path / "a.db")) as store:
        await store.append("s", [Deposited(amount=1), Deposited(amount=2)])
    async with tidings.open_store(url(tmp_path / "a.db")) as store:
        assert [r.event.amount async for r in store.read_stream("s")] == [1, 2]
        assert (await store.append("s", [Deposited(amount=3)], expected_version=2)).position == 3


async def test_uses_wal_and_full_sync_by_default(tmp_path: Path) -> None:
    async with tidings.open_store(url(tmp_path / "a.db")) as store:
        await store.append("s", [Note(text="x")])
    conn = sqlite3.connect(tmp_path / "a.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert isinstance(store, SQLiteEventStore) and store.synchronous == "full"


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    async with tidings.open_store(url(tmp_path / "g.db")) as store:
        assert isinstance(store, SQLiteEventStore)
        await store.append("warm", [Note(text="x")])
        before = store.commits
        results = await asyncio.gather(
            *(store.append(f"s-{i}", [Note(text=str(i))], expected_version=0) for i in range(200))
        )
        commits = store.commits - before
        assert sorted(r.position for r in results) == list(range(2, 202))
        assert commits < 100, f"200 concurrent appends took {commits} commits"


def _run(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


APPENDER = """
    import asyncio, sys
    import tidings
    from tests.events import Note

    async def main():
        async with tidings.open_store(sys.argv[1]) as store:
            for i in range(int(sys.argv[3])):
                await store.append(sys.argv[2], [Note(text=str(i))])

    asyncio.run(main())
"""


async def test_processes_migrate_and_write_one_new_file_at_once(tmp_path: Path) -> None:
    target = url(tmp_path / "shared.db")
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            textwrap.dedent(APPENDER),
            target,
            f"p{i}",
            "25",
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(4)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    assert [p.returncode for p in procs] == [0] * 4, [o[1] for o in outputs]
    async with tidings.open_store(target) as store:
        assert [s.version async for s in store.streams()] == [25] * 4
        assert [r.position async for r in store.read_all()] == list(range(1, 101))


async def test_subscriber_sees_appends_from_another_process(tmp_path: Path) -> None:
    target = url(tmp_path / "x.db")
    async with tidings.open_store(target) as store:
        await store.append("local", [Note(text="0")])
        got: list[str] = []

        async def follow() -> None:
            async for record in store.subscribe():
                got.append(record.stream_id)
                if len(got) == 4:
                    return

        task = asyncio.create_task(follow())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", textwrap.dedent(APPENDER), target, "remote", "3", cwd=ROOT
        )
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await asyncio.wait_for(task, timeout=10)
        assert got == ["local", "remote", "remote", "remote"]


async def test_corrupt_row_names_its_place(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with tidings.open_store(url(path)) as store:
        await store.append("s", [Note(text="fine"), Note(text="to be broken")])
    conn = sqlite3.connect(path)
    conn.execute("UPDATE tidings_events SET data = '{not json' WHERE position = 2")
    conn.commit()
    conn.close()
    async with tidings.open_store(url(path)) as store:
        with pytest.raises(EventDecodeError) as info:
            [r async for r in store.read_all()]
        assert (info.value.stream_id, info.value.version, info.value.position) == ("s", 2, 2)


@pytest.mark.parametrize(
    ("given", "path"),
    [
        ("sqlite:///app.db", "app.db"),
        ("sqlite:///data/app.db", "data/app.db"),
        ("sqlite:////var/lib/app.db", "/var/lib/app.db"),
        ("sqlite:///with%20space.db?synchronous=normal", "with space.db"),
    ],
)
def test_url_to_path(given: str, path: str) -> None:
    assert SQLiteEventStore.from_url(given).path == path


@pytest.mark.parametrize(
    "bad",
    [
        "sqlite://host/app.db",
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///a.db?synchronous=sometimes",
        "sqlite:///a.db?nosuch=1",
        "sqlite:///a.db?busy_timeout=soon",
        "nosuch:///a.db",
        "not a url",
    ],
)
def test_bad_urls_are_configuration_errors(bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        tidings.open_store(bad)
    assert isinstance(info.value, ValueError)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "asyncpg" else real(name, *a)
    )
    import tidings.store as store_module

    monkeypatch.setitem(
        store_module.BACKENDS, "postgresql", ("tidings.store._absent", "X", "asyncpg", "postgres")
    )
    with pytest.raises(ConfigurationError, match=r'pip install "tidings\[postgres\]"'):
        tidings.open_store("postgresql://localhost/db")


async def test_create_false_never_creates(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreNotFound):
        async with tidings.open_store(url(missing), create=False):
            pass
    assert not missing.exists()
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).close()
    with pytest.raises(StoreNotFound, match="no tidings tables"):
        async with tidings.open_store(url(plain), create=False):
            pass


async def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"junk\.db"):
        async with tidings.open_store(url(junk)):
            pass


@pytest.mark.parametrize(
    "driver_error",
    [
        sqlite3.OperationalError("database is locked"),
        sqlite3.DatabaseError("file is not a database"),
        sqlite3.IntegrityError("UNIQUE constraint failed"),
    ],
)
def test_driver_errors_map_to_store_error(driver_error: sqlite3.Error) -> None:
    with pytest.raises(StoreError) as info, _mapped_errors("x.db"):
        raise driver_error
    assert info.value.__cause__ is driver_error
    assert "x.db" in str(info.value)


@settings(max_examples=2000)
@given(
    st.integers(min_value=0, max_value=253_402_300_799_999_999)  # to 9999-12-31
    | st.integers(min_value=2**31 * 10**6, max_value=2**32 * 10**6)  # where floats get tight
)
def test_stored_microseconds_come_back_exactly(micros: int) -> None:
    expected = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    assert _from_micros(micros) == expected


@given(st.binary(min_size=16, max_size=16))
def test_fast_uuid_equals_the_checked_one(raw: bytes) -> None:
    fast, checked = uuid_from_bytes(raw), UUID(bytes=raw)
    assert fast == checked and hash(fast) == hash(checked) and str(fast) == str(checked)
    assert fast.version == checked.version


async def test_read_only_open_leaves_a_foreign_file_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE mine (x)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    with pytest.raises(StoreNotFound):
        async with tidings.open_store(url(foreign), create=False):
            pass
    assert foreign.read_bytes() == before
    conn = sqlite3.connect(foreign)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


async def test_the_event_loop_thread_only_does_small_indexed_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes, scans and big batches run on the writer and reader threads; only lookups by
    key, short stream reads and the newest position (a few microseconds) run inline on the
    event loop."""
    calls: list[tuple[int, str]] = []

    class Watched(sqlite3.Connection):
        def execute(self, sql: str, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
            calls.append((threading.get_ident(), sql))
            return super().execute(sql, *args, **kwargs)

        def executemany(self, sql: str, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
            calls.append((threading.get_ident(), sql))
            return super().executemany(sql, *args, **kwargs)

    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return real_connect(*args, factory=Watched, **kwargs)

    monkeypatch.setattr("tidings.store.sqlite.sqlite3.connect", connect)
    loop_thread = threading.get_ident()
    async with tidings.open_store(url(tmp_path / "t.db")) as store:
        await asyncio.gather(*(store.append(f"s{i}", [Note(text=str(i))]) for i in range(50)))
        await store.append("s0", [Note(text="again")], expected_version=1)
        await store.append("big", [Note(text=str(i)) for i in range(300)])
        [r async for r in store.read_all()]
        [r async for r in store.read_all(types=[Note])]
        [r async for r in store.read_stream("s0", backwards=True)]
        assert len([r async for r in store.read_stream("big")]) == 300
        [s async for s in store.streams()]
        await store.stream_version("s1")
        await store.last_position()
        await store.read_query(Query(QueryItem(tags=["none:such"])))
    assert calls, "the watch saw no SQLite calls at all"
    on_loop = [" ".join(sql.split()) for thread, sql in calls if thread == loop_thread]
    inline = ("PRAGMA busy_timeout", "PRAGMA synchronous", "PRAGMA query_only")
    for sql in on_loop:
        if sql.startswith(inline):
            continue  # opening the loop thread's own read-only connection
        if sql.startswith(("BEGIN", "COMMIT")) or "FROM tidings_tags t WHERE t.tag = :v" in sql:
            continue  # a decision's read (read_query): a few tag index ranges
        assert sql.startswith("SELECT"), sql
        if sql == "SELECT coalesce(max(position), 0) FROM tidings_events":
            continue  # the primary key's last entry (last_position)
        assert "WHERE stream_id = ?" in sql, sql  # a lookup by key, never a scan
        assert "LIMIT ?" in sql or "tidings_streams" in sql, sql
    assert any("position > ?" in sql for thread, sql in calls if thread != loop_thread)
    big_batches = [sql for sql in on_loop if "version >= ?" in sql]
    assert len(big_batches) == 1  # the first, short batch of "big"; the rest went to readers
