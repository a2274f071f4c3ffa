"""`tidings run` and `tidings dlq`: starting and stopping a service, and clear errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tidings
from tests.backends import BROKER_BACKENDS, broker_url, require
from tidings.cli.main import app

SERVICE = """
import tidings

broker = tidings.open_broker("memory://")
service = tidings.Service("mailer", broker)


class Ping(tidings.Event, type="test.cli.ping"):
    n: int


@service.handler("pings")
async def on_ping(event: Ping) -> None:
    pass
"""


def test_run_starts_a_service_and_stops_it_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "mailer_app.py").write_text(SERVICE)
    process = subprocess.Popen(
        [sys.executable, "-m", "tidings.cli.main", "run", "mailer_app:service"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert "running mailer: [('pings', 'mailer')]" in first, first
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "mailer stopped" in out


def test_run_names_a_target_that_is_not_a_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "not_a_service.py").write_text("thing = 42\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "not_a_service:thing"])
    assert result.exit_code == 2
    assert "not_a_service:thing is a int, not a tidings.Service" in result.output
    result = CliRunner().invoke(app, ["run", "no_colon_here"])
    assert result.exit_code == 2 and "module:attribute" in result.output


def test_dlq_list_on_an_empty_broker_and_a_missing_one() -> None:
    result = CliRunner().invoke(app, ["dlq", "list", "--broker", "memory://", "--json"])
    assert result.exit_code == 0 and result.output == ""
    result = CliRunner().invoke(app, ["dlq", "show", "nope", "--broker", "memory://"])
    assert result.exit_code == 2 and "no dead letter 'nope'" in result.output
    result = CliRunner().invoke(app, ["dlq", "list", "--broker", "kafkaish://x"])
    assert result.exit_code == 2 and "unknown broker URL" in result.output


class Parcel(tidings.Event, type="test.cli.parcel"):
    n: int


REAL_BROKERS = [b for b in BROKER_BACKENDS if b != "memory"]  # memory keeps nothing between runs


async def _dead_letter_one(url: str, topic: str) -> str:
    async with tidings.open_broker(url) as broker:
        await broker.declare(topic, "cli")
        await broker.publish(topic, Parcel(n=7))
        async with broker.subscribe(topic, group="cli") as deliveries:
            async with asyncio.timeout(10):
                delivery = await anext(aiter(deliveries))
            dead = await delivery.dead_letter("boom: the label printer is out of paper")
        return dead.id


async def _redelivered(url: str, topic: str) -> tuple[int, list[str]]:
    async with tidings.open_broker(url) as broker:
        async with broker.subscribe(topic, group="cli") as deliveries:
            async with asyncio.timeout(10):
                delivery = await anext(aiter(deliveries))
            await delivery.ack()
        left = [dead.id for dead in await broker.dead_letters(topic)]
        return delivery.event.n, left  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", REAL_BROKERS)
def test_dlq_list_show_and_replay_on_a_real_broker(backend: str) -> None:
    require(backend)
    url, topic = broker_url(backend), f"cli-{uuid.uuid4().hex[:10]}"
    dead_id = asyncio.run(_dead_letter_one(url, topic))
    runner = CliRunner()

    listed = runner.invoke(app, ["dlq", "list", "--broker", url, "--topic", topic, "--json"])
    assert listed.exit_code == 0, listed.output
    [line] = [json.loads(text) for text in listed.output.splitlines()]
    assert (line["id"], line["topic"], line["group"]) == (dead_id, topic, "cli")
    assert line["error"] == "boom: the label printer is out of paper" and line["attempts"] == 1

    shown = runner.invoke(app, ["dlq", "show", dead_id, "--broker", url])
    assert shown.exit_code == 0, shown.output
    shown_letter = json.loads(shown.output)
    assert shown_letter["attributes"]["type"] == "test.cli.parcel"
    assert json.loads(shown_letter["data"]) == {"n": 7}

    replayed = runner.invoke(app, ["dlq", "replay", dead_id, "--broker", url])
    assert replayed.exit_code == 0 and f"replayed {dead_id} to {topic}/cli" in replayed.output
    assert asyncio.run(_redelivered(url, topic)) == (7, [])
