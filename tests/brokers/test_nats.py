"""NATS-only behaviour the conformance suite cannot state for every broker."""

from __future__ import annotations

import contextlib
import uuid

import pytest

from tests.backends import NATS, require
from tidings.brokers import open_broker
from tidings.core.errors import ConfigurationError


async def test_a_stream_keeps_its_retention_and_the_other_one_is_refused_by_name() -> None:
    require("nats")
    import nats
    import nats.js.errors

    stream = f"TIDINGS_T{uuid.uuid4().hex[:8].upper()}"
    prefix = f"t{uuid.uuid4().hex[:8]}"
    url = f"{NATS}?stream={stream}&prefix={prefix}&max_age=60&dead_letter_max_age=60"
    try:
        async with open_broker(f"{url}&retention=interest"):
            pass
        refused = rf"{stream} .* interest retention, not limits"
        with pytest.raises(ConfigurationError, match=refused):
            async with open_broker(url):
                pass
        with pytest.raises(ConfigurationError, match="retention is 'limits' or 'interest'"):
            open_broker(f"{url}&retention=forever")
    finally:
        nc = await nats.connect(NATS)
        try:
            js = nc.jetstream()
            for name in (stream, f"{stream}_DLQ"):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(name)
        finally:
            await nc.close()
