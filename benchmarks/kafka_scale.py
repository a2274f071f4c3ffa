"""Scenario 25: Kafka consumers scaled out, 2 member processes of one group against 1.

A topic of 4 partitions holds N events keyed over 64 keys (published before the timing). A
consumer process runs `Service("scale", broker)` with one handler that spends about 50 µs of
CPU per event (a busy loop, standing for real work) and counts what it handled; the members
of the group divide the partitions between them (Kafka's own group protocol, on the Tansu
broker the bench starts). Each side starts its member processes ahead, tells them to go at
once, and is timed from "go" until the members together have handled all N (the group's join
and the rebalance are inside the timing: they are what a user waits for); a fresh group per
round and side, sides alternating, best of the rounds. Every event must be handled once:
the members report their counts.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlite_store import Measured

WORK_US = 50.0
PARTITIONS = 4
KEYS = 64

MEMBER = r"""
import asyncio, os, sys, time
from tidings import Event, Service, open_broker


class Job(Event, type="bench.kafka_scale.job"):
    n: int


def busy(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


url, topic, group, go, work, total = sys.argv[1:7]


async def main() -> None:
    async with open_broker(url) as broker:
        await broker.declare(topic, group)
        service = Service(group, broker)
        handled = 0

        @service.handler(topic)
        async def job(event: Job) -> None:
            nonlocal handled
            busy(float(work))
            handled += 1
            if handled % 200 == 0:
                print(f"handled {handled}", flush=True)

        print("ready", flush=True)
        while not os.path.exists(go):
            await asyncio.sleep(0.005)
        running = asyncio.create_task(service.run())
        stop = go + ".stop"
        while not os.path.exists(stop):
            await asyncio.sleep(0.02)
        service.stop()
        await running
        print(f"final {handled}", flush=True)


asyncio.run(main())
"""


async def _publish(url: str, topic: str, events: int) -> None:
    import tidings

    class Job(tidings.Event, type="bench.kafka_scale.job"):  # the members' own, by name
        n: int

    async with tidings.open_broker(url) as broker:
        for start in range(0, events, 100):
            for key in range(KEYS):
                batch = [Job(n=n) for n in range(start, min(start + 100, events)) if n % KEYS == key]
                if batch:
                    await broker.publish_many(topic, batch, key=f"k{key}")


async def _round(url: str, folder: str, topic: str, members: int, events: int) -> float:
    script = os.path.join(folder, "kafka_member.py")
    group = f"scale-{uuid.uuid4().hex[:8]}"
    go = Path(folder) / f"go-{group}"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            script,
            url,
            topic,
            group,
            str(go),
            str(WORK_US),
            str(events),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(members)
    ]
    counts = [0] * members

    async def follow(i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            word, _, number = raw.decode().strip().partition(" ")
            if word in ("handled", "final"):
                counts[i] = int(number)

    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise SystemExit(f"scenario 25: a member did not start: {line!r}")
        readers = [asyncio.create_task(follow(i, p)) for i, p in enumerate(procs)]
        go.touch()
        start = time.perf_counter()
        deadline = start + 300
        while sum(counts) < events - 200 * members:  # the last lines come at the stop
            if time.perf_counter() > deadline or any(p.returncode is not None for p in procs):
                raise SystemExit(f"scenario 25: the members handled {sum(counts)} of {events}")
            await asyncio.sleep(0.01)
        # Within the last count line of each member: stop them and read their finals.
        Path(f"{go}.stop").touch()
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 60)
        await asyncio.gather(*readers)
        elapsed = time.perf_counter() - start
        if sum(counts) != events:
            raise SystemExit(f"scenario 25: {sum(counts)} handled, not {events}")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return events / elapsed


async def _run(url: str, directory: str, events: int, rounds: int, advance: Callable[[int], None]) -> Measured:
    measured = Measured(
        info={
            "events": events,
            "partitions": PARTITIONS,
            "keys": KEYS,
            "handler_cpu_us_per_event": WORK_US,
            "timed": "from go (members started and connected ahead) until every event is "
            "handled, the group's join and rebalance included",
        }
    )
    with tempfile.TemporaryDirectory(dir=directory) as folder:
        Path(folder, "kafka_member.py").write_text(MEMBER)
        for number in range(rounds):
            for members in (1, 2) if number % 2 == 0 else (2, 1):
                topic = f"bench-scale-{uuid.uuid4().hex[:8]}"
                await _publish(url, topic, events)
                rate = await _round(url, folder, topic, members, events)
                (measured.tidings if members == 2 else measured.raw).append(rate)
                advance(events)
    return measured


def scale_out(
    url: str, directory: str, events: int, rounds: int, advance: Callable[[int], None]
) -> Measured:
    """Events/s of one group: `tidings` = 2 member processes, `raw` = 1."""
    return asyncio.run(_run(url, directory, events, rounds, advance))


if __name__ == "__main__":
    from brokers import KafkaTarget

    async def start() -> KafkaTarget:
        target = KafkaTarget("tansu", "scale")
        await target.probe()
        return target

    target = asyncio.run(start())
    try:
        url = target.tidings_url.replace("?", f"?partitions={PARTITIONS}&", 1)
        quick = "--quick" in sys.argv
        found = scale_out(url, tempfile.gettempdir(), 4000 if quick else 20_000, 1, lambda n: None)
        two, one = max(found.tidings), max(found.raw)
        print(f"2 members {two:.0f} events/s, 1 member {one:.0f} events/s: {two / one:.2f}x")
    finally:
        target.close()
