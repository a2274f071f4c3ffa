"""Leases: a named, expiring claim, so only one of several workers runs each projection.

The store methods check their arguments; backends take and release a lease atomically.
"""

from __future__ import annotations

from abc import abstractmethod

from tidings.store.core import StoreCore

__all__ = ["Leases"]


class Leases(StoreCore):
    """`acquire_lease` and `release_lease`."""

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease `name` for `owner` for `ttl` seconds; False while another
        owner holds it unexpired. Workers use it so one of them runs each projection."""
        self._check_open()
        if ttl <= 0:
            raise ValueError(f"a lease lasts a positive time, not {ttl}")
        return await self._acquire_lease(name, owner, ttl)

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up now (if `owner` holds it), so another worker takes over at once."""
        self._check_open()
        await self._release_lease(name, owner)

    async def lease_owners(self, prefix: str = "") -> dict[str, str]:
        """Every unexpired lease whose name starts with `prefix`, and its owner: who runs
        what, for status pages and for workers dividing a projection's segments."""
        self._check_open()
        return await self._lease_owners(prefix)

    # -- backend primitives ----------------------------------------------------------------

    @abstractmethod
    async def _acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Atomically: take the lease if free, expired or already `owner`'s; report success."""

    @abstractmethod
    async def _release_lease(self, name: str, owner: str) -> None:
        """Delete the lease if `owner` holds it."""

    @abstractmethod
    async def _lease_owners(self, prefix: str) -> dict[str, str]:
        """Unexpired leases named `prefix...`, by name, with their owners."""
