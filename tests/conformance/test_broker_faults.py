"""The broker contract under faults, on every backend in `tests.backends.BROKER_BACKENDS`.

1. A member of a group is SIGKILLed (`broker_child.py`, its own process) while it holds
   unacked messages: another member of the group gets every message that was not acked,
   the held ones again (at least once: duplicates are allowed, losses are not).
2. The broker server restarts mid-stream: on a private server the test starts on a free
   loopback port (never the shared one other tests use), events are published while a member
   consumes; the server stops and starts again on the same port and data. Every publish that
   returned arrives, a publish that raised raised a `StoreError` within a bounded time (and
   goes again after the restart), and the member reconnected by itself. Kafka's private
   server is a Tansu broker keeping its log in an S3 bucket on the tests' moto (its memory
   storage would lose every topic in a restart), killed and started again.

Redelivery and retry timeouts are shortened through the broker URL, so both run in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from tests.backends import BROKER_BACKENDS, broker_url, require
from tests.conformance.broker_child import CODEC, Numbered
from tests.reliability.servers import PRIVATE_SERVERS, private_server
from tidings.brokers import BrokerBase, open_broker
from tidings.core.errors import StoreError, TidingsError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="sends SIGKILL and SIGTERM"),
]

CHILD = Path(__file__).with_name("broker_child.py")
GROUP = "faults"

# Redelivery of what a dead member held, shortened: Redis takes a dead member's shards and
# keyless entries once its lease (and the XAUTOCLAIM idle time, the same) has passed; NATS
# redelivers after `ack_wait`. RabbitMQ returns them as soon as the connection drops.
FAST_REDELIVERY = {
    "redis": {"lease": "1"},
    "nats": {"ack_wait": "1", "pull_expires": "1"},
    "kafka": {"session_timeout": "6"},
}
REDELIVERY_BOUND = 15.0  # seconds for every unacked message to come back after the kill
LINE_TIMEOUT = 20.0  # seconds for the child to start and take its messages


def with_options(url: str, options: dict[str, str]) -> str:
    """`url` with `options` added to (or replacing those in) its query."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True)) | options
    return urlunsplit(parts._replace(query=urlencode(query)))


def key_of(n: int) -> str | None:
    """Half the events keyed (four keys), half keyless: both delivery paths of an adapter."""
    return f"k{n % 4}" if n % 2 == 0 else None


# -- 1. a member is SIGKILLed while it holds messages -------------------------------------


@dataclass
class ChildLog:
    """What the child printed: what it got (with attempts) and which acks it began."""

    got: dict[int, int] = field(default_factory=dict)  # n -> attempt
    acking: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)

    def read(self, line: str) -> None:
        word, *rest = line.split()
        if word == "got":
            self.got[int(rest[0])] = int(rest[1])
        elif word == "acking":
            self.acking.add(int(rest[0]))
        elif word == "acked":
            self.acked.add(int(rest[0]))

    @property
    def held(self) -> set[int]:
        """Delivered to the child and never acked, not even possibly."""
        return set(self.got) - self.acking


@pytest.mark.parametrize("backend", BROKER_BACKENDS)
async def test_a_sigkilled_members_unacked_messages_go_to_another_member(backend: str) -> None:
    require(backend)
    if backend == "memory":
        pytest.skip("the memory broker lives inside one process: nothing survives its death")
    url = with_options(broker_url(backend), FAST_REDELIVERY.get(backend, {}))
    topic = f"t-{uuid.uuid4().hex[:10]}"
    events = {n: Numbered(n=n) for n in range(24)}
    async with open_broker(url, codec=CODEC) as broker:
        await broker.declare(topic, GROUP)
        for n, event in events.items():
            await broker.publish(topic, event, key=key_of(n))

        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CHILD),
            url,
            topic,
            GROUP,
            "--ack-every",
            "3",
            "--prefetch",
            "8",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        log = ChildLog()
        try:
            assert child.stdout is not None
            async with asyncio.timeout(LINE_TIMEOUT):
                while len(log.held) < 4 or not log.acked:
                    line = await child.stdout.readline()
                    if not line:
                        break  # it ended by itself: reported below
                    log.read(line.decode())
        finally:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGKILL)
            out, err = await child.communicate()
        for line in out.decode().splitlines():  # printed before the kill, read after it
            log.read(line)
        assert child.returncode == -signal.SIGKILL, (
            f"the child ended by itself (rc={child.returncode}):\n{err.decode()}"
        )
        assert log.held, f"the child held nothing when it was killed: {log}"

        # Everything but what the child (perhaps) acked must come to this member now.
        wanted = set(events) - log.acking
        again: dict[int, list[int]] = defaultdict(list)  # n -> attempts seen here
        started = time.monotonic()
        async with broker.subscribe(topic, group=GROUP) as deliveries:
            try:
                async with asyncio.timeout(REDELIVERY_BOUND):
                    async for delivery in deliveries:
                        n = delivery.event.n  # type: ignore[attr-defined]
                        assert delivery.event == events[n]
                        again[n].append(delivery.attempt)
                        await delivery.ack()
                        if wanted <= again.keys():
                            break
            except TimeoutError:
                pass  # reported below, with what is missing
        took = time.monotonic() - started
    print(
        f"{backend}: the child held {sorted(log.held)}, acked {sorted(log.acked)}; "
        f"{len(again)} messages came here within {took:.1f}s, attempts {dict(again)}"
    )
    missing = sorted(wanted - again.keys())
    assert not missing, (
        f"{backend}: after {took:.1f}s these unacked messages never came back: {missing} "
        f"(the child held {sorted(log.held)}, acked {sorted(log.acked)})"
    )
    # What the child held was delivered before: it comes back counted as a redelivery.
    first_time = {n: again[n] for n in log.held if min(again[n]) < 2}
    assert not first_time, f"{backend}: held messages came back as attempt 1: {first_time}"


# -- 2. the broker server restarts mid-stream ----------------------------------------------

NO_PRIVATE_SERVER = {
    "memory": "the memory broker has no server to restart",
    "rabbitmq": "a private RabbitMQ node is too heavy to start in a test (seconds of Erlang "
    "boot, a cookie and a node name); tests/reliability/test_server_faults.py restarts the "
    "shared node's application instead",
    "sqs": "moto keeps its queues in memory: a restarted moto has lost every message, which "
    "is not what an AWS outage does; tests/brokers/test_sqs.py checks the bounded publish",
    "eventbridge": "moto keeps its buses and queues in memory: a restarted moto has lost every "
    "message; tests/brokers/test_sqs.py checks the bounded publish",
}
EVENTS = 120
PACE = 0.02  # seconds between publishes
OUTAGE = 1.5  # seconds the server stays down
PUBLISH_BOUND = 10.0  # seconds a publish may take to give up while the server is down
ARRIVAL_BOUND = 20.0  # seconds for everything published to arrive after the restart


@dataclass
class Attempt:
    """One call of `publish`: when it began and ended, and what it raised."""

    n: int
    began: float
    ended: float = 0.0
    error: BaseException | None = None


@pytest.mark.parametrize("backend", BROKER_BACKENDS)
async def test_a_broker_restart_mid_stream_loses_nothing(backend: str, tmp_path: Path) -> None:
    require(backend)
    if backend in NO_PRIVATE_SERVER or backend not in PRIVATE_SERVERS:
        pytest.skip(NO_PRIVATE_SERVER.get(backend, f"no private {backend} server to restart"))
    topic = f"t-{uuid.uuid4().hex[:10]}"
    events = [Numbered(n=n) for n in range(EVENTS)]
    by_id = {event.event_id: event for event in events}
    async with (
        private_server(backend, tmp_path) as server,
        open_broker(server.url, codec=CODEC) as publisher,
        open_broker(server.url, codec=CODEC) as consumer,
    ):
        await publisher.declare(topic, GROUP)
        attempts: list[Attempt] = []
        arrived: dict[uuid.UUID, int] = defaultdict(int)  # event id -> deliveries
        ack_errors: list[BaseException] = []
        quarter, arrival = asyncio.Event(), asyncio.Event()

        async def publish(n: int) -> None:
            attempt = Attempt(n, time.monotonic())
            attempts.append(attempt)
            if len(attempts) == EVENTS // 4:
                quarter.set()
            try:
                async with asyncio.timeout(PUBLISH_BOUND * 2):  # a hang fails the test
                    await publisher.publish(topic, events[n], key=key_of(n))
            except TidingsError as exc:  # anything else fails the test as it is
                attempt.error = exc
            finally:
                attempt.ended = time.monotonic()

        async def publish_all() -> None:
            for n in range(EVENTS):
                await publish(n)
                await asyncio.sleep(PACE)

        async def consume(broker: BrokerBase) -> None:
            async with broker.subscribe(topic, group=GROUP) as deliveries:
                async for delivery in deliveries:
                    event = delivery.event
                    assert by_id[event.event_id] == event
                    arrived[event.event_id] += 1
                    arrival.set()
                    try:
                        await delivery.ack()
                    except TidingsError as exc:  # the server is down: it comes again
                        ack_errors.append(exc)

        consuming = asyncio.create_task(consume(consumer))
        publishing = asyncio.create_task(publish_all())
        try:
            async with asyncio.timeout(10):
                await quarter.wait()
            # Tansu serves on for seconds while it shuts down in order, past the rest of the
            # stream: it is killed instead (its S3 storage holds every acknowledged record).
            await server.stop(crash=backend == "kafka")
            down = time.monotonic()
            await asyncio.sleep(OUTAGE)
            await server.start()
            up = time.monotonic()
            async with asyncio.timeout(EVENTS * (PACE + 0.5) + 2 * PUBLISH_BOUND):
                await publishing
            failed = [a for a in attempts if a.error is not None]
            for attempt in failed:  # the server is back: the same events go again
                await publish(attempt.n)
            retried = attempts[EVENTS:]
            assert all(a.error is None for a in retried), [repr(a.error) for a in retried]

            published = {events[a.n].event_id for a in attempts if a.error is None}
            try:
                async with asyncio.timeout(ARRIVAL_BOUND):
                    while not published <= arrived.keys():
                        arrival.clear()
                        await arrival.wait()
            except TimeoutError:
                pass  # reported below, with what is missing
            if consuming.done():  # it should run until cancelled: it failed
                await consuming
        finally:
            for task in (consuming, publishing):
                task.cancel()
            await asyncio.gather(consuming, publishing, return_exceptions=True)

    during = [a for a in attempts[:EVENTS] if a.began < up and a.ended > down]
    print(
        f"{backend}: down {up - down:.1f}s; {len(during)} publishes overlapped the outage, "
        f"{len(failed)} raised ({[f'{a.ended - a.began:.1f}s {a.error!r}' for a in failed]}); "
        f"{sum(arrived.values())} deliveries of {len(arrived)} events; "
        f"{len(ack_errors)} acks failed"
    )
    assert during, "no publish overlapped the outage: the test did not test it"
    for attempt in failed:
        assert isinstance(attempt.error, StoreError), repr(attempt.error)
        assert attempt.ended - attempt.began <= PUBLISH_BOUND, (
            f"publishing {attempt.n} took {attempt.ended - attempt.began:.1f}s to fail"
        )
        assert attempt.ended > down - 0.5, f"publishing {attempt.n} failed before the outage"
    missing = sorted(by_id[i].n for i in published - arrived.keys())
    assert not missing, (
        f"{backend}: published but never delivered after the restart: {missing} "
        f"({len(failed)} publishes raised and went again, {len(ack_errors)} acks failed)"
    )
    after = [a for a in attempts[:EVENTS] if a.began > up and a.error is None]
    assert after, "nothing was published after the restart: the reconnect was not tested"
