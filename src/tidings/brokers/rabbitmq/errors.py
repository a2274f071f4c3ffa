"""RabbitMQ's errors: the failures that mean the link to RabbitMQ failed, one
`RabbitMQBrokerError`, and closing a channel that may be gone already."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from tidings.core.errors import BrokerError

log = logging.getLogger("tidings.brokers.rabbitmq")

_CLOSE_TIMEOUT = 5.0
_FAILURES = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,  # aiormq's "<Connection ...> closed": a channel asked of a dropped connection
)
# Closing or settling on a channel (or connection) that is going or gone.
_GONE = (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError, RuntimeError)


class RabbitMQBrokerError(BrokerError):
    """RabbitMQ failed: unreachable after the bounded retries, or it refused an operation."""


def _link_failure(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether `exc` means the link to RabbitMQ failed: one of `kinds`, or the bare
    `Exception()` aiormq sets on every pending future when a connection closes without a
    reason (seen when a connection is cut mid-operation)."""
    return isinstance(exc, kinds) or type(exc) is Exception


def _failed(exc: BaseException) -> bool:
    """Whether `exc` means the link to RabbitMQ failed (retry, or say it is unreachable)."""
    return _link_failure(exc, _FAILURES)


def _gone(exc: BaseException) -> bool:
    """Whether `exc` means the channel or connection is going or gone (nothing to undo)."""
    return _link_failure(exc, _GONE)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no answer"
    return str(exc) or type(exc).__name__


async def _close(channel: aio_pika.abc.AbstractChannel | None) -> None:
    """Close a channel, bounded; one of a dropped connection is closed already."""
    if channel is None or channel.is_closed:
        return
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await channel.close()
    except Exception as exc:
        if not _gone(exc):
            raise
        log.debug("closing a channel failed: %s", _describe(exc))
