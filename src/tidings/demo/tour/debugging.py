"""Step 10, debugging: the causation tree of the refunded order, as `tidings trace` shows it."""

from __future__ import annotations

from rich.console import Console

from tidings.app.runner import ProjectionRunner
from tidings.app.trace import causation_tree
from tidings.cli import render
from tidings.demo.tour.common import Tour, _chapter, _correlation, _say
from tidings.store import EventStore


async def debugging(store: EventStore, runner: ProjectionRunner, tour: Tour, out: Console) -> None:
    _chapter(out, "10. Debugging: the causation tree of one order")
    head = await store.last_position()
    await runner.wait_for(head)
    refunded = next(o for o, s in tour.statuses.items() if s == "cancelled")
    tour.traced = _correlation(refunded)
    tour.trace = await causation_tree([store], tour.traced)
    _say(
        out,
        f"Every event of order {refunded} carries the correlation id {tour.traced} and the "
        "id of what caused it; each step names who wrote it:",
    )
    out.print(render.trace_tree(tour.traced, tour.trace, show_store=False, show_time=False))
    _say(out, f"The same tree, any time later: tidings trace {tour.traced} --store URL")
