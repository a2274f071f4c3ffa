"""Render the reliability results (JSON Lines from the scenarios) as `reliability-report.md`.

python -m tests.reliability.report RESULTS.jsonl reliability-report.md
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

COLUMNS = (
    ("Scenario", "scenario"),
    ("Backend", "backend"),
    ("Load", "load"),
    ("Faults injected", "faults"),
    ("Events in", "events_in"),
    ("Events out", "events_out"),
    ("Lost", "lost"),
    ("Duplicated effects", "duplicated"),
    ("Time to recover", "recover_seconds"),
    ("Notes", "notes"),
)


def _cell(key: str, value: object) -> str:
    if value is None:
        return "n/a"
    if key == "recover_seconds":
        return f"≤ {float(value):.2f} s"  # type: ignore[arg-type]
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict[str, object]], *, when: str, commit: str, seconds: float) -> str:
    """The report's markdown."""
    lost = sum(int(r["lost"]) for r in rows)  # type: ignore[call-overload]
    duplicated = sum(int(r["duplicated"]) for r in rows)  # type: ignore[call-overload]
    modes = sorted({str(r.get("mode", "")) for r in rows})
    lines = [
        "# Reliability report",
        "",
        f"Produced by `make reliability` on {when}, commit `{commit}`, on this repository's "
        f"development machine ({platform.machine()}, {_cpus()} cores, Python "
        f"{platform.python_version()}); mode: {', '.join(modes)}; {len(rows)} scenarios in "
        f"{seconds / 60:.1f} minutes.",
        "",
        f"**Lost: {lost}. Duplicated effects: {duplicated}.**",
        "",
        "| " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(key, row.get(key)) for _, key in COLUMNS) + " |")
    lines += [
        "",
        "Each row is a pytest test in `tests/reliability/` (marked `reliability`); `make test` "
        "runs the same scenarios at a smaller scale. *Time to recover* is the longest time, "
        "over the scenario's faults, from a fault to the system working again (a restarted "
        "process consuming, a reconnected client appending).",
        "",
    ]
    return "\n".join(lines)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def main(argv: list[str]) -> None:
    source, target = Path(argv[0]), Path(argv[1])
    seconds = float(argv[2]) if len(argv) > 2 else 0.0
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    target.write_text(render(rows, when=when, commit=commit or "?", seconds=seconds))
    print(f"wrote {target}: {len(rows)} rows")


if __name__ == "__main__":
    main(sys.argv[1:])
