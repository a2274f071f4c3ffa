"""Leases: one `INSERT ... ON CONFLICT` on the writer, so taking a lease is atomic."""

from __future__ import annotations

import sqlite3
import time

from tidings.store.sqlite.connection import SQLiteCore


class SQLiteLeases(SQLiteCore):
    """`_acquire_lease`, `_release_lease` and `_lease_owners`."""

    async def _acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        def work(conn: sqlite3.Connection, now: int) -> bool:
            row = conn.execute(
                "INSERT INTO tidings_leases (name, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                "WHERE tidings_leases.owner = excluded.owner OR tidings_leases.expires_at < ? "
                "RETURNING owner",
                (name, owner, now + int(ttl * 1_000_000), now),
            ).fetchone()
            return row is not None and row[0] == owner

        return await self._write(work)

    async def _release_lease(self, name: str, owner: str) -> None:
        def work(conn: sqlite3.Connection, now: int) -> None:
            conn.execute("DELETE FROM tidings_leases WHERE name = ? AND owner = ?", (name, owner))

        await self._write(work)

    async def _lease_owners(self, prefix: str) -> dict[str, str]:
        now = time.time_ns() // 1000

        def work(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute(
                "SELECT name, owner FROM tidings_leases WHERE substr(name, 1, ?) = ? "
                "AND expires_at >= ?",
                (len(prefix), prefix, now),
            ).fetchall()
            return dict(rows)

        return self._inline(work)  # a handful of rows by primary key range
