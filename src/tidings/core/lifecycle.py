"""`AsyncResource`: `async with` for the objects that are opened and closed (stores, brokers,
inboxes), written once; `OpenOnce`, the open-once, close-once lifecycle of stores and brokers;
`AsyncContext`, the `async with` part of their protocols."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from tidings.core.errors import StoreClosed

if TYPE_CHECKING:
    from tidings.core.codec import JSONCodec

__all__ = ["AsyncContext", "AsyncResource", "OpenOnce"]


class AsyncContext(Protocol):
    """What a protocol of an `async with` resource (`EventStore`, `Broker`) has in common."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class AsyncResource:
    """`async with resource:` opens it (`open()`) and closes it at the end (`aclose()`)."""

    async def open(self) -> Self:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class OpenOnce(AsyncResource, ABC):
    """Opened once around the subclass's `_open` and closed once around its `_close`; a
    closed one stays closed. Stores and brokers share it."""

    codec: JSONCodec
    _opened = False
    _closed = False

    async def open(self) -> Self:
        if self._closed:
            raise StoreClosed(f"{type(self).__name__} was closed; open a new one")
        if not self._opened:
            self.codec.registry.check()  # a gap in an upcaster chain fails here, at start-up
            await self._open()
            self._opened = True
        return self

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing()
        if self._opened:
            await self._close()

    def _closing(self) -> None:
        """Called once as closing starts, before `_close` (a store wakes its waiters)."""

    @abstractmethod
    async def _open(self) -> None: ...

    @abstractmethod
    async def _close(self) -> None: ...
