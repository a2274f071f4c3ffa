"""Step 1, event sourcing: what `run_ledger` did to the account, told (replay, time travel,
the refused stale writer, snapshots, the read model)."""

from __future__ import annotations

import json

from rich.console import Console

from tidings.cli import render
from tidings.demo.ledger import SNAPSHOT_EVERY, AccountBalances, LedgerRun
from tidings.demo.tour.common import _say


def _show_ledger(out: Console, run: LedgerRun) -> None:
    _say(
        out,
        f"Wrote 4 events to stream {run.stream_id} through Repository(Account): each save "
        "named the version it expected (NO_STREAM, then 1, 2, 3).",
    )
    if run.refusal is not None:
        _say(
            out,
            f"Optimistic concurrency: a second writer loaded the account at version "
            f"{run.refusal.expected} (balance {run.balance_at_2}) and tried to withdraw all "
            f"of it; its save was refused (the stream is at version {run.refusal.actual}); "
            "nothing was written.",
        )
    out.print(render.ledger_table(run.stream_id, run.steps))
    _say(
        out,
        f"Time travel: repo.get({run.account_id!r}, version=2) -> "
        f"balance as of version 2 = {run.balance_at_2}",
    )
    _say(out, f"Current state: balance = {run.balance}", "bold green")
    if run.snapshot_version is not None:
        after = run.steps[-1].record.version - run.snapshot_version
        _say(
            out,
            f"Snapshots: the repository saved the account's state every {SNAPSHOT_EVERY} "
            f"events; loading it now reads the snapshot at version {run.snapshot_version} and "
            f"{after} event after it, not the whole stream.",
        )
    _say(
        out,
        f"Read model (CQRS): after runner.wait_for({run.position}), "
        f"{AccountBalances.name}[{run.stream_id!r}] = {json.dumps(run.read_model)}",
    )
