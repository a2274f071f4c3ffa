"""`make bench` keeps working: its smoke run completes and reports every scenario."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_run_reports_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/run.py",
            "--quick",
            "--dir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert set(results["scenarios"]) >= {
        "single_event_appends",
        "batch_appends_100",
        "concurrent_single_appends",
        "read_all_decoded",
        "aggregate_load_snapshots",
        "projection_catch_up",
        "save_vs_eventsourcing",
        "concurrent_save_vs_eventsourcing",
        "load_vs_eventsourcing",
    }, results["scenarios"].keys()
    for scenario in results["scenarios"].values():
        assert scenario["tidings"] > 0 and scenario["baseline"] > 0
        assert scenario["ratio"] == pytest.approx(
            scenario["tidings"] / scenario["baseline"], rel=0.02
        )
        assert scenario["target_direction"] in ("at least", "at most")
