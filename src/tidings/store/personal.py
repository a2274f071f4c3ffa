"""Personal data: the per-subject keys that seal an event's personal fields, and `forget`.

Appending seals personal values with their subject's key and reading opens them; forgetting
a subject deletes its key (crypto-shredding), so the events stay in place but read
`REDACTED`. The key lookups live here once; backends only store and delete the keys.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from tidings.core.events import Event
from tidings.core.personal import PREFIX, subjects_in
from tidings.store.contracts import Row
from tidings.store.core import StoreCore

__all__ = ["PersonalData"]


class PersonalData(StoreCore):
    """`forget`, and the keys that appends seal and reads open personal values with."""

    async def forget(self, subject: str) -> None:
        """Forget a data subject: delete the key its personal fields were encrypted with, so
        they read `REDACTED` everywhere from now on (the events stay, in place). Snapshots are
        dropped too (they are caches and may hold the data in clear); rebuild read models
        that copied it. A new event about the subject later gets a new key."""
        if not isinstance(subject, str) or not subject:
            raise ValueError(f"a data subject is a non-empty string, not {subject!r}")
        self._check_open()
        await self._forget(subject)

    async def _keys_to_seal(self, events: Sequence[Event]) -> dict[str, bytes] | None:
        """The keys of the subjects of these events' personal fields (made when new)."""
        subjects = {
            str(getattr(event, subject))
            for event in events
            if isinstance(event, Event)
            for field, subject in event.__personal__.items()
            if getattr(event, field) is not None
        }
        if not subjects:
            return None
        self._check_open()
        return await self._subject_keys(subjects, create=True)

    async def _keys_to_open(self, rows: list[Row]) -> dict[str, bytes] | None:
        """The keys for the sealed personal values in these rows (a forgotten one is absent);
        None at once when no class this store decodes has personal fields."""
        if not self.codec.registry.personal:
            return None
        subjects: set[str] = set()
        for row in rows:
            data = row[7]
            text = data if isinstance(data, str) else bytes(data).decode()
            if PREFIX in text:
                subjects |= subjects_in(text)
        if not subjects:
            return None
        return await self._subject_keys(subjects, create=False)

    # -- backend primitives ----------------------------------------------------------------

    @abstractmethod
    async def _subject_keys(self, subjects: set[str], create: bool) -> dict[str, bytes]:
        """The keys of these data subjects; with `create`, new ones for those without."""

    @abstractmethod
    async def _forget(self, subject: str) -> None:
        """Delete the subject's key and every snapshot, leaving no copy on disk."""
