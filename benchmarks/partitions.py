"""Scenario 25: a Kafka consumer group scaled out by processes, 1 to 6 members on 4 partitions.

One topic of 4 partitions holds N events keyed over 64 keys (16 on each partition by Kafka's
default partitioner, taken round-robin: an even load), published once. Each side is a fresh
consumer group (declared before the publish, so it reads them all) of M member processes,
each running `Service(group, broker)` with one handler (concurrency 1: a member handles one
event at a time) that awaits `WORK_MS` of I/O (an `asyncio.sleep`, standing for a downstream
call) and then prints what it handled. The processes are started and their broker opened
ahead; they are told to go at once, so they join in one generation (Tansu's initial
rebalance delay collects them) and the join is not what is timed.

The rate is of the events handled while every busy member is at work (from the last one's
first event to the first one's last), as the members' clocks (one machine) stamped them, so
a member that started a moment late does not count as slowness (Tansu answers one member's
SyncGroup about 1 s after the others' now and then: a broker artefact, not the group's rate;
a side whose window is shorter than `MIN_WINDOW` is timed from its first event). Sides
M = 1, 2, 4, 6 in turn, best of the rounds. Each side is checked: every event handled, and
within each member each key's events in publish order (a key lives in one partition, a
partition in one member); events handled twice (a rebalance mid-stream) are counted and recorded.

With I/O-bound handlers a member's rate is about 1 / (WORK_MS + its overhead), so the group's
grows with members up to the partition count (4) and not beyond: a fifth and sixth member get
no partition and stand idle. A CPU-bound handler would stop at the machine's 2 cores instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from sqlite_store import Measured

PARTITIONS = 4
KEYS = 64
WORK_MS = 5.0
MEMBERS = (1, 2, 4, 6)  # the sides; the row compares 4 (the partition count) with 1
READY_BOUND = 30.0  # seconds for a member process to start and open the broker
SIDE_BOUND = 180.0  # seconds for one side to handle everything
MIN_WINDOW = 0.5  # seconds: a shorter all-busy window is timed from the first event instead

WORKER = r"""
import asyncio, os, signal, sys, time
from tidings import Event, JSONCodec, Service, TypeRegistry, open_broker

REGISTRY = TypeRegistry()


class Numbered(Event, type="bench.partitions.numbered", registry=REGISTRY):
    n: int
    key: str


url, topic, group, go, work = sys.argv[1:6]
pause = float(work) / 1000


async def main() -> None:
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    async with open_broker(url, codec=JSONCodec(REGISTRY)) as broker:
        service = Service(group, broker)

        @service.handler(topic)
        async def handle(event: Numbered) -> None:
            await asyncio.sleep(pause)  # the downstream call
            print(f"{time.time():.6f} {event.n} {event.key}", flush=True)

        print("ready", flush=True)
        while not os.path.exists(go):
            await asyncio.sleep(0.005)
        running = asyncio.create_task(service.run())
        told = asyncio.create_task(stopping.wait())
        await asyncio.wait({running, told}, return_when=asyncio.FIRST_COMPLETED)
        service.stop()
        await running


asyncio.run(main())
"""


def balanced_keys() -> list[str]:
    """KEYS keys, KEYS / PARTITIONS on each partition by Kafka's default partitioner
    (murmur2 of the key, as aiokafka and the Java client place a keyed record), so events
    taken round-robin over the keys load the partitions evenly and no member waits on a
    heavier one."""
    from aiokafka.partitioner import murmur2

    per: dict[int, list[str]] = defaultdict(list)
    n = 0
    while min(len(per[p]) for p in range(PARTITIONS)) < KEYS // PARTITIONS:
        key = f"k{n}"
        part = (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS
        if len(per[part]) < KEYS // PARTITIONS:
            per[part].append(key)
        n += 1
    return sorted((key for keys in per.values() for key in keys), key=lambda k: int(k[1:]))


def _urls(url: str) -> str:
    """The broker URL with this scenario's partition count (in place of any other)."""
    base, _, query = url.partition("?")
    options = {**dict(parse_qsl(query)), "partitions": str(PARTITIONS)}
    return f"{base}?{urlencode(options)}"


async def _publish(url: str, topic: str, groups: list[str], events: int) -> None:
    """Declare every side's group, then publish the events (keyed, in order) once."""
    import tidings

    registry = tidings.TypeRegistry()

    class Numbered(tidings.Event, type="bench.partitions.numbered", registry=registry):
        n: int
        key: str

    keys = balanced_keys()
    async with tidings.open_broker(url, codec=tidings.JSONCodec(registry)) as broker:
        for group in groups:
            await broker.declare(topic, group)
        chunk = KEYS * 10  # each key's next 10 events in one publish_many, keys concurrently
        for start in range(0, events, chunk):
            numbers = range(start, min(events, start + chunk))
            await asyncio.gather(
                *(
                    broker.publish_many(
                        topic,
                        [Numbered(n=n, key=keys[k]) for n in numbers if n % KEYS == k],
                        key=keys[k],
                    )
                    for k in range(KEYS)
                    if any(n % KEYS == k for n in numbers)
                )
            )


async def _side(
    url: str, folder: str, topic: str, group: str, members: int, events: int,
    advance: Callable[[int], None],
) -> dict[str, Any]:  # fmt: skip
    """Run one side to the end; its rate and checks."""
    script = os.path.join(folder, "partitions_member.py")
    go = Path(folder) / f"go-{group}"
    command = [script, url, topic, group, str(go), str(WORK_MS)]
    errors = Path(folder) / f"{group}.stderr"  # a file: a pipe nobody reads fills up
    with errors.open("wb") as sink:
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, *command, stdout=asyncio.subprocess.PIPE, stderr=sink
            )
            for _ in range(members)
        ]
    handled: list[list[tuple[float, int, str]]] = [[] for _ in procs]
    seen: set[int] = set()
    done = asyncio.Event()

    async def read(index: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            stamp, n, key = line.split()
            handled[index].append((float(stamp), int(n), key.decode()))
            if int(n) not in seen:
                seen.add(int(n))
                advance(1)
                if len(seen) == events:
                    done.set()

    readers: list[asyncio.Task[None]] = []
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), READY_BOUND)
            if line.strip() != b"ready":
                error = errors.read_text(errors="replace")[-2000:]
                raise SystemExit(f"scenario 25: a member did not start: {line!r}\n{error}")
        readers = [asyncio.create_task(read(i, p)) for i, p in enumerate(procs)]
        go.touch()
        try:
            await asyncio.wait_for(done.wait(), SIDE_BOUND)
        except TimeoutError:
            raise SystemExit(
                f"scenario 25: {members} members handled {len(seen)} of {events} events "
                f"in {SIDE_BOUND:.0f} s"
            ) from None
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        await asyncio.gather(*(proc.wait() for proc in procs))
        await asyncio.gather(*readers)  # to each member's end of output: late doubles count
    stamps = [stamp for member in handled for stamp, _, _ in member]
    total = sum(len(member) for member in handled)
    for member in handled:  # a key's events in publish order within each member
        last: dict[str, int] = defaultdict(lambda: -1)
        for _, n, key in member:
            if n < last[key]:
                raise SystemExit(f"scenario 25: key {key} out of order: {n} after {last[key]}")
            last[key] = n
    # Timed while every busy member is at work: from when the last of them handled its first
    # event (one that joined a moment later shows the join's cost, not the group's rate) to
    # when the first of them handled its last.
    busy = [member for member in handled if member]
    began = max(member[0][0] for member in busy)
    ended = min(member[-1][0] for member in busy)
    counted = sum(1 for stamp in stamps if began < stamp <= ended)
    from_first = events / (max(stamps) - min(stamps))
    return {
        # A side too short for the window (a member that synced late, Tansu's ~1 s, while the
        # others nearly finished): the whole span, which counts that member's wait as slowness.
        "rate": counted / (ended - began) if ended - began >= MIN_WINDOW else from_first,
        "all_busy_s": ended - began,
        "rate_from_first": from_first,
        "stagger_s": began - min(stamps),
        "handled_twice": total - events,
        "busy_members": len(busy),
        "per_member": sorted(len(member) for member in handled),
    }


def scale_out(
    url: str,
    events: int,
    rounds: int,
    advance: Callable[[int], None],
    sides: tuple[int, ...] = MEMBERS,
) -> Measured:
    """Events/s of a consumer group: `tidings` = 4 member processes, `raw` = 1; every
    member count's rates (of `sides`, which must hold 1 and 4) in `info`."""
    url = _urls(url)
    tag = uuid.uuid4().hex[:8]
    topic = f"bench-{tag}-partitions"
    groups = {
        (number, members): f"bench-{tag}-{number}-{members}"
        for number in range(rounds)
        for members in sides
    }
    asyncio.run(_publish(url, topic, list(groups.values()), events))
    rates: dict[int, list[float]] = {members: [] for members in sides}
    twice: dict[int, int] = dict.fromkeys(sides, 0)
    busy: dict[int, int] = dict.fromkeys(sides, 0)
    spread: dict[int, list[int]] = {}
    stagger: dict[int, float] = dict.fromkeys(sides, 0.0)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "partitions_member.py").write_text(WORKER)
        for number in range(rounds):
            order = sides if number % 2 == 0 else sides[::-1]
            for members in order:
                found = asyncio.run(
                    _side(url, folder, topic, groups[number, members], members, events, advance)
                )
                rates[members].append(found["rate"])
                twice[members] += found["handled_twice"]
                busy[members] = max(busy[members], found["busy_members"])
                spread[members] = found["per_member"]
                stagger[members] = max(stagger[members], found["stagger_s"])
    best = {members: max(found) for members, found in rates.items()}
    return Measured(
        tidings=rates[PARTITIONS],
        raw=rates[1],
        info={
            "events": events,
            "partitions": PARTITIONS,
            "keys": KEYS,
            "handler": f"await asyncio.sleep({WORK_MS / 1000:g}) per event, one at a time "
            "per member (Service concurrency=1)",
            "members": list(sides),
            "events_per_s_by_members": {str(m): round(best[m]) for m in sides},
            "speedup_by_members": {str(m): round(best[m] / best[1], 2) for m in sides},
            "members_with_work": {str(m): busy[m] for m in sides},
            "events_per_member": {str(m): spread[m] for m in sides},
            "largest_start_stagger_s": {str(m): round(stagger[m], 3) for m in sides},
            "handled_twice_by_members": {str(m): twice[m] for m in sides},
            "timed": "while every busy member is at work: from the last one's first event to "
            "the first one's last (member clocks; one machine); joins and their stagger excluded",
        },
    )


if __name__ == "__main__":
    import brokers

    quick = "--quick" in sys.argv
    target = brokers.connect("kafka", "tansu")
    if isinstance(target, str):
        raise SystemExit(target)
    try:
        found = scale_out(target.tidings_url, 512 if quick else 2048, 1, lambda n: None)
    finally:
        target.close()
    print(found.info)
