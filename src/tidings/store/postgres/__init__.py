"""The PostgreSQL event store, on asyncpg: `PostgresEventStore`, one module per job.

- `store`: `PostgresEventStore` itself: URL and options, opening (the pool) and closing, and
  the mixins below assembled into one class.
- `connection`: `PostgresCore`, the base of the mixins: the store's state, handing out
  connections with driver errors translated, dropping those whose link went silent.
- `schema`: the tables version by version (including the PL/pgSQL append function) and the
  migration run when the store opens.
- `append`: one append, one round trip, retried once on a lost connection.
- `reads`: stream and log reads, including the gap-free reading of the log up to a hole.
- `subscriptions`: LISTEN/NOTIFY, and how long a caught-up subscriber waits.
- `projections`: snapshots, projection checkpoints and rebuilds, read-model documents, and
  the personal-data keys.
- `leases`: named, expiring leases.
"""

from tidings.store.postgres.schema import _migrations as _migrations
from tidings.store.postgres.store import PostgresEventStore

__all__ = ["PostgresEventStore"]
