"""Redis's errors: `RedisBrokerError`, and which redis-py failures mean the link is down."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tidings.core.errors import BrokerError

_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisBrokerError(BrokerError):
    """Redis failed (unreachable after retries, or refused a command)."""
