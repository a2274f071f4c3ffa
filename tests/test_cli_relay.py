"""`tidings relay`: the outbox relay from a shell, once or until stopped, with clear errors."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tidings
from tests.backends import REDIS, require
from tests.test_cli import assert_one_line_error, child_env
from tidings.cli.main import app


class Shipped(tidings.Event, type="test.cli.relay.shipped"):
    parcel: str


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200", "TIDINGS_STORE": None, "TIDINGS_BROKER": None})


async def _store_with(url: str, count: int) -> None:
    async with tidings.open_store(url) as store:
        await store.append("parcel-1", [Shipped(parcel=str(n)) for n in range(count)])


async def _taken(broker_url: str, topic: str, count: int) -> list[tidings.Delivery]:
    async with tidings.open_broker(broker_url) as broker:
        got: list[tidings.Delivery] = []
        async with broker.subscribe(topic, group="g") as deliveries:
            async with asyncio.timeout(10):
                async for delivery in deliveries:
                    got.append(delivery)
                    await delivery.ack()
                    if len(got) == count:
                        break
        return got


def test_relay_once_publishes_what_is_stored_then_nothing_more(
    runner: CliRunner, tmp_path: Path
) -> None:
    require("redis")
    store = f"sqlite:///{tmp_path / 'events.db'}"
    broker = f"{REDIS}?prefix=cli-relay-{uuid.uuid4().hex[:8]}"
    asyncio.run(_store_with(store, 5))

    async def declare() -> None:
        async with tidings.open_broker(broker) as opened:
            await opened.declare("parcels", "g")

    asyncio.run(declare())
    command = ["relay", "--once", "--store", store, "--broker", broker]
    result = runner.invoke(app, [*command, "--route", "test.cli.relay.*=parcels"])
    assert result.exit_code == 0, result.output
    assert "relay default: published 5 events, at 5" in result.stdout
    got = asyncio.run(_taken(broker, "parcels", 5))
    assert [d.event.parcel for d in got] == ["0", "1", "2", "3", "4"]  # type: ignore[attr-defined]
    again = runner.invoke(app, [*command, "--route", "test.cli.relay.*=parcels"])
    assert "published 0 events, at 5" in again.stdout  # the checkpoint held


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--route", "no-equals"], "pattern=topic"),
        (["--route", "=parcels"], "a pattern and a topic"),
        ([], "give at least one --route"),
    ],
)
def test_a_bad_route_is_one_clear_line(
    runner: CliRunner, tmp_path: Path, options: list[str], expected: str
) -> None:
    store = f"sqlite:///{tmp_path / 'events.db'}"
    asyncio.run(_store_with(store, 1))
    result = runner.invoke(app, ["relay", "--store", store, "--broker", "memory://", *options])
    assert_one_line_error(result, expected)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGTERM")
def test_relay_runs_until_sigterm(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'events.db'}"
    asyncio.run(_store_with(store, 3))
    command = [sys.executable, "-m", "tidings.cli.main", "relay", "--store", store]
    command += ["--broker", "memory://", "--topic", "all"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    ) as process:
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            assert first.startswith("relay default (") and "from position" in first, first
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, err
    assert "relay default: stopped at" in out
