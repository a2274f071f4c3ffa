"""Leases on every store: one owner at a time, renewal, expiry, release."""

from __future__ import annotations

import asyncio

import pytest

from tests.app.test_projections import Balances, write_accounts
from tidings import ProjectionRunner
from tidings.store.base import StoreBase


async def test_one_owner_at_a_time(store: StoreBase) -> None:
    assert await store.acquire_lease("p", "a", 30)
    assert not await store.acquire_lease("p", "b", 30)
    assert await store.acquire_lease("p", "a", 30)  # a renewal
    assert await store.acquire_lease("other", "b", 30)  # leases are per name
    await store.release_lease("p", "b")  # not b's to release
    assert not await store.acquire_lease("p", "b", 30)
    await store.release_lease("p", "a")
    assert await store.acquire_lease("p", "b", 30)


async def test_an_expired_lease_can_be_taken(store: StoreBase) -> None:
    assert await store.acquire_lease("p", "a", 0.2)
    assert not await store.acquire_lease("p", "b", 5)
    await asyncio.sleep(0.3)
    assert await store.acquire_lease("p", "b", 5)
    assert not await store.acquire_lease("p", "a", 5)  # a's renewal came too late


async def test_a_lease_lasts_a_positive_time(store: StoreBase) -> None:
    with pytest.raises(ValueError):
        await store.acquire_lease("p", "a", 0)


async def test_runners_with_leases_share_a_projection(store: StoreBase) -> None:
    head = await write_accounts(store, 5)
    first = ProjectionRunner(store, [Balances()], lease=0.3, owner="first")
    second = ProjectionRunner(store, [Balances()], lease=0.3, owner="second")
    async with first:
        await first.wait_for(head)
        async with second:
            await asyncio.sleep(0.4)
            assert first.leases() == {"balances": True}
            assert second.leases() == {"balances": False}
            await second.wait_for(head)  # reads the owner's checkpoint
            await first.stop()  # releases the lease: the second takes over
            more = await write_accounts(store, 2, prefix="b")
            await second.wait_for(more, timeout=5)
            assert second.leases() == {"balances": True}
    balances = await second.read_model(Balances).all()
    assert len(balances) == 7 and all(doc["events"] == 3 for doc in balances.values())
