"""NATS' errors: which nats-py failures the broker turns into a `BrokerError` (it raises
`BrokerError` itself, no subclass), and how a failure reads in one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

import nats.errors

_NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _quietly(action: Awaitable[None]) -> None:
    with contextlib.suppress(*_NATS_ERRORS):
        await action
