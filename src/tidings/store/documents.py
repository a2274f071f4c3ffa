"""Read models: the documents a projection keeps, read back by key, in pages or in a batch.

`DocumentNotLoaded` is how a reader that can only load with `await` asks the projection to
load a key first. Writes go through `commit_projection` (see `checkpoints`), with the
checkpoint, in one transaction.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence

from tidings.store.core import StoreCore

__all__ = ["DocumentNotLoaded", "Documents"]


class DocumentNotLoaded(BaseException):
    """Raised by a document reader that can only read with `await` (PostgreSQL) for a key it
    has not loaded yet; the projection loads it and applies the event again.

    A `BaseException`, so a handler's own `except Exception` never swallows it.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)


class Documents(StoreCore):
    """Reading a projection's documents: one, all of them by key, or synchronously."""

    async def get_document(self, name: str, key: str, generation: int | None = None) -> str | None:
        """One document of a projection's read model (the live generation by default)."""
        self._check_open()
        return (await self._get_documents(name, generation, [key])).get(key)

    async def documents(
        self, name: str, generation: int | None = None
    ) -> AsyncIterator[tuple[str, str]]:
        """Every `(key, document)` of a read model, by key, read in pages."""
        self._check_open()
        after = ""
        while True:
            batch = await self._documents_batch(name, generation, after, self.batch_size)
            for item in batch:
                yield item
            if len(batch) < self.batch_size:
                return
            after = batch[-1][0]

    def document_reader(self, name: str, generation: int) -> Callable[[str], str | None]:
        """A synchronous lookup of committed documents, for handlers running in a batch."""
        self._check_open()
        return self._document_reader(name, generation)

    # -- backend primitives ----------------------------------------------------------------

    @abstractmethod
    async def _get_documents(
        self, name: str, generation: int | None, keys: Sequence[str]
    ) -> dict[str, str]:
        """The stored documents among `keys` (live generation when None)."""

    @abstractmethod
    async def _documents_batch(
        self, name: str, generation: int | None, after: str, limit: int
    ) -> list[tuple[str, str]]:
        """Up to `limit` documents whose keys sort after `after`, by key."""

    @abstractmethod
    def _document_reader(self, name: str, generation: int) -> Callable[[str], str | None]:
        """A synchronous, cheap lookup of committed documents of one generation."""
