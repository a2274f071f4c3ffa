"""Leases in the PostgreSQL store: one upsert takes or renews a lease, unless another owner
holds it unexpired."""

from __future__ import annotations

from tidings.store.postgres.connection import PostgresCore

__all__ = ["PostgresLeases"]


class PostgresLeases(PostgresCore):
    """`_acquire_lease`, `_release_lease` and `_lease_owners`."""

    async def _acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        holder = await self._fetchval(
            f"INSERT INTO {self._s}.tidings_leases (name, owner, expires_at) "
            "VALUES ($1, $2, now() + make_interval(secs => $3)) "
            "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
            "expires_at = excluded.expires_at "
            f"WHERE {self._s}.tidings_leases.owner = excluded.owner "
            f"OR {self._s}.tidings_leases.expires_at < now() "
            "RETURNING owner",
            name,
            owner,
            ttl,
        )
        return bool(holder == owner)

    async def _release_lease(self, name: str, owner: str) -> None:
        await self._execute(
            f"DELETE FROM {self._s}.tidings_leases WHERE name = $1 AND owner = $2",
            name,
            owner,
        )

    async def _lease_owners(self, prefix: str) -> dict[str, str]:
        rows = await self._fetch(
            f"SELECT name, owner FROM {self._s}.tidings_leases WHERE starts_with(name, $1) "
            "AND expires_at >= now()",
            prefix,
        )
        return {name: owner for name, owner in rows}
