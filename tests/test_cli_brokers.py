"""`tidings run` and `tidings dlq`: starting and stopping a service, and clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

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
