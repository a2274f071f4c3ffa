"""`StoreCore`: what every part of a store shares — its settings, open and close, decoding.

The concern mixins (`reading`, `appending`, `subscriptions`, `snapshots`, ...) all build on
this class, so each sees the codec, the limits, `_check_open` and `_decode` without
importing one another; `StoreBase` combines them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError, StoreClosed
from tidings.core.lifecycle import OpenOnce
from tidings.core.recorded import RecordedEvent
from tidings.store.contracts import Row
from tidings.store.signals import AppendSignal

__all__ = ["DEFAULT_MAX_EVENT_SIZE", "StoreCore"]

DEFAULT_MAX_EVENT_SIZE = 1024 * 1024


class StoreCore(OpenOnce, ABC):
    """The state and lifecycle shared by every concern of a store backend."""

    def __init__(
        self,
        *,
        codec: JSONCodec | None = None,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        batch_size: int = 1000,
    ) -> None:
        if max_event_size < 1 or batch_size < 1:
            raise ConfigurationError("max_event_size and batch_size must be positive")
        self.codec = codec or JSONCodec()
        self.max_event_size = max_event_size
        self.batch_size = batch_size
        self._signal = AppendSignal()

    # -- lifecycle (`OpenOnce`) -------------------------------------------------------------

    def _closing(self) -> None:
        self._signal.notify()

    def _check_open(self) -> None:
        if not self._opened or self._closed:
            state = (
                "closed"
                if self._closed
                else "not open yet (use `async with` or `await store.open()`)"
            )
            raise StoreClosed(f"{type(self).__name__} is {state}")

    # -- decoding --------------------------------------------------------------------------

    def _decode(
        self,
        rows: list[Row],
        keep_unknown: bool = False,
        keys: Mapping[str, bytes] | None = None,
    ) -> Iterator[RecordedEvent[Any]]:
        codec = self.codec
        if keep_unknown and not codec.keep_unknown:  # this read asked for raw UnknownEvents
            codec = self._keeping = getattr(self, "_keeping", None) or JSONCodec(
                codec.registry, keep_unknown=True
            )
        return codec.iter_rows(rows, id_of=self._id_of, time_of=self._time_of, keys=keys)

    # -- backend primitives ----------------------------------------------------------------

    #: How the backend's rows hold the id and the time, when not as `UUID` and `datetime`.
    _id_of: Callable[[Any], UUID] | None = None
    _time_of: Callable[[Any], datetime] | None = None

    @abstractmethod
    async def _open(self) -> None:
        """Connect and make the schema current."""

    @abstractmethod
    async def _close(self) -> None:
        """Release every connection and thread."""
