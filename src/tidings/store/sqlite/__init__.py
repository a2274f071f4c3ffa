"""`SQLiteEventStore`: the embedded default, one file, WAL, no server.

One writer thread owns the write connection and commits appends in groups: every append
waiting when a commit starts joins it, each checked against its own expected version inside a
savepoint, so one failing append never takes others with it, and a hundred appends share one
fsync. Scans run on a small pool of reader threads, each with its own connection; lookups by
key and short stream reads run inline on the loop's own read-only connection (microseconds,
less than a thread hand-off); rows are decoded on the loop. Other processes may write the same
file; their appends reach this process's subscribers by polling.

The code lives in the modules of this package, one per job (as in `tidings.store.postgres`):

- `store`: `SQLiteEventStore` itself: URL and options, opening (WAL, migrating) and closing,
  and the mixins below assembled into one class.
- `connection`: `SQLiteCore`, the base of the mixins: the store's state, opening a connection
  with its pragmas, the reader connections (`_run`, `_inline`), driver errors translated.
- `schema`: the tables version by version (`MIGRATIONS`) and migrating, the statements the
  writer and readers share, and stored times (microseconds).
- `append`: the writer thread and its group commit; `_write` for every other write.
- `reads`: stream and log reads, the stream list, tracing lookups.
- `subscriptions`: one `AppendSignal` per file in a process (waking), and polling.
- `projections`: snapshots, projection checkpoints and rebuilds, read-model documents, and
  the personal-data keys.
- `leases`: named, expiring leases.
"""

from __future__ import annotations

# `sqlite3` stays an attribute here: tests patch `tidings.store.sqlite.sqlite3.connect`.
import sqlite3 as sqlite3

from tidings.store.sqlite.connection import _mapped_errors as _mapped_errors
from tidings.store.sqlite.schema import MIGRATIONS as MIGRATIONS
from tidings.store.sqlite.schema import _from_micros as _from_micros
from tidings.store.sqlite.store import SQLiteEventStore

__all__ = ["SQLiteEventStore"]
