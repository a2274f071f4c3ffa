"""The `EventStore` protocol, its value types, and the behaviour every backend shares.

A backend subclasses `StoreBase` and implements the `_`-prefixed primitives (open, close,
append encoded rows, read one batch). Validation, encoding, paging, and the catch-up-then-wait
loop of `subscribe` are written once, so every backend behaves the same.

This module assembles `StoreBase` from one mixin per concern and re-exports the names callers
have always imported from here; the code lives in the modules beside it:

- `contracts`: the `EventStore` protocol and its value types (`AppendResult`, `StreamInfo`,
  `ANY`, ...), and `Row`.
- `validation`: checks on stream ids, expected versions, metadata and `types=` filters, and
  how a retried append is told from a clash.
- `core`: settings, open and close, decoding rows (`StoreCore`, which the mixins build on).
- `appending`, `reading`, `subscriptions`, `correlation`: writing, paged reading, the
  catch-up-then-wait loop, and tracing lookups.
- `snapshots`, `checkpoints`, `documents`, `leases`, `personal`: snapshots, projection
  checkpoints and rebuilds, read-model documents, leases, and personal-data keys.
- `signals`: `AppendSignal`; `options`: `url_options`.
"""

from __future__ import annotations

from tidings.store import contracts
from tidings.store.appending import _NO_KEYS as _NO_KEYS
from tidings.store.appending import Appending
from tidings.store.checkpoints import Checkpoints, ProjectionConflict, ProjectionState
from tidings.store.checkpoints import advance_projection as advance_projection
from tidings.store.checkpoints import begin_rebuild as begin_rebuild
from tidings.store.checkpoints import swap_rebuild as swap_rebuild
from tidings.store.contracts import *  # noqa: F403  (the protocol and its value types)
from tidings.store.core import DEFAULT_MAX_EVENT_SIZE as DEFAULT_MAX_EVENT_SIZE
from tidings.store.core import StoreCore
from tidings.store.correlation import Correlation
from tidings.store.documents import DocumentNotLoaded, Documents
from tidings.store.leases import Leases
from tidings.store.options import url_options as url_options
from tidings.store.personal import PersonalData
from tidings.store.reading import _END_OF_STREAM as _END_OF_STREAM
from tidings.store.reading import FIRST_BATCH as FIRST_BATCH
from tidings.store.reading import Reading
from tidings.store.signals import AppendSignal as AppendSignal
from tidings.store.signals import _wake as _wake
from tidings.store.snapshots import Snapshot, Snapshots
from tidings.store.subscriptions import Subscriptions
from tidings.store.validation import MAX_STREAM_ID_LENGTH as MAX_STREAM_ID_LENGTH
from tidings.store.validation import _int64 as _int64
from tidings.store.validation import _storable as _storable
from tidings.store.validation import expected_matches as expected_matches
from tidings.store.validation import resolve_duplicates as resolve_duplicates
from tidings.store.validation import type_names as type_names
from tidings.store.validation import validate_expected as validate_expected
from tidings.store.validation import validate_stream_id as validate_stream_id

__all__ = ["DocumentNotLoaded", "ProjectionConflict", "ProjectionState", "Snapshot", "StoreBase"]
__all__ += contracts.__all__


class StoreBase(
    Subscriptions,
    Correlation,
    Reading,
    Appending,
    Snapshots,
    Checkpoints,
    Documents,
    Leases,
    PersonalData,
    StoreCore,
):
    """Shared behaviour of the store backends; see `EventStore` for the contract."""
