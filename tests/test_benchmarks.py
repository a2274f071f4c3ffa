"""`make bench` keeps working: its smoke run completes and reports every scenario.

The PostgreSQL scenarios (9-11) run against the server the store tests use
(`$TIDINGS_TEST_POSTGRES`), the broker and outbox relay scenarios (12-18) against Redis, NATS
and RabbitMQ, Kafka's (20-21, 25) against the Tansu broker the run starts; a server that is
not running must have its rows reported as skipped, saying why, and the rest of the run must
still complete.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backends import NATS, POSTGRES, RABBITMQ, REDIS, REQUIRE_SERVICES, _reachable

ROOT = Path(__file__).resolve().parents[1]
BROKER_ROWS = (
    "publish_vs_raw",
    "publish_vs_faststream",
    "consume_vs_raw",
    "consume_vs_faststream",
)


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
            "--postgres",
            POSTGRES,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    postgres = {
        "pg_single_event_appends",
        "pg_concurrent_vs_eventsourcing",
        "pg_notify_latency",
    }
    if _reachable(POSTGRES) or REQUIRE_SERVICES:
        assert set(results["scenarios"]) >= postgres, results["skipped"]
        latency = results["scenarios"]["pg_notify_latency"]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"]
        assert latency["p99_ms"] == pytest.approx(latency["tidings"], abs=0.001)
    else:
        assert set(results["skipped"]) >= postgres
        assert all("not reachable" in skip["reason"] for skip in results["skipped"].values())
    for backend, server in (("redis", REDIS), ("nats", NATS), ("rabbitmq", RABBITMQ)):
        rows = {f"{backend}_{side}" for side in BROKER_ROWS} | {f"relay_{backend}"}
        if _reachable(server) or REQUIRE_SERVICES:  # measured against both peers
            assert set(results["scenarios"]) >= rows, results["skipped"]
        else:
            assert set(results["skipped"]) >= rows
    kafka = {f"kafka_{side}" for side in BROKER_ROWS} | {"kafka_group_scale_out"}
    if REQUIRE_SERVICES or not set(results["skipped"]) & kafka:  # Tansu, started by the run
        assert set(results["scenarios"]) >= kafka, results["skipped"]
        group = results["scenarios"]["kafka_group_scale_out"]["parameters"]
        assert group["members_with_work"] == {"1": 1, "4": 4}  # every partition had a member
        assert group["events_per_member"]["4"] == [group["events"] // 4] * 4
    dcb = {  # scenarios 22-23: conditioned appends
        "dcb_pg_disjoint_16",
        "dcb_pg_overlap_16",
        "dcb_pg_vs_plain",
        "dcb_sqlite_disjoint_16",
        "dcb_sqlite_overlap_16",
    }
    if _reachable(POSTGRES) or REQUIRE_SERVICES:
        assert set(results["scenarios"]) >= dcb, results["skipped"]
    assert set(results["scenarios"]) >= {
        "single_event_appends",
        "batch_appends_100",
        "concurrent_single_appends",
        "read_all_decoded",
        "read_all_upcast",
        "aggregate_load_snapshots",
        "projection_catch_up",
        "segments_catch_up",
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
