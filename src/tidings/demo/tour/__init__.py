"""`tidings demo`'s story: every pattern of the seed article, as it happens, on one store.

1. Event sourcing: the account ledger (replay to 120, time travel, a refused stale writer,
   snapshots, a read model).
2. Schema evolution: an order the previous release stored as `order.placed` v1, read as v2.
3. Commands: the order service takes orders through its `CommandBus`.
4. Outbox: its relay publishes what was stored, and only that.
5. Event notification: the email service gets an id and asks for the rest.
6. Event-carried state transfer: the analytics service keeps its own copy.
7. A process manager: payment, shipping, and a refund when shipping fails.
8. CQRS: a second read model, orders by customer.
9. Temporal decoupling: analytics stops, orders go on, analytics catches up.
10. Debugging: the causation tree of one order.

The order service (store, command bus, relay, read models, process manager, notifier) runs
in this process. The email and analytics services run here too on the in-memory broker, or,
with a broker URL, as worker processes of their own (`tidings.demo.services`).

A module per step, told in this order by `story.run_tour` (4 to 6 share one):

- `ledger.py` (1), `evolution.py` (2), `commands.py` (3), `messaging.py` (4 to 6: what
  reaches the other services), `process.py` (7), `cqrs.py` (8), `decoupling.py` (9) and
  `debugging.py` (10).
- `common.py`: the cast (customers, orders), `Tour` and the helpers every step uses.
- `workers.py`: where the email and analytics services run (tasks, or processes).
"""

from __future__ import annotations

from tidings.demo.tour.common import Tour
from tidings.demo.tour.story import run_tour

__all__ = ["Tour", "run_tour"]
