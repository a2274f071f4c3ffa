"""Where the email and analytics services run: as tasks of this process on the in-memory
broker, or as worker processes of their own (`python -m tidings.demo.services`) over a real
broker; the steps start and stop them by name either way."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tidings.app.inbox import SQLiteInbox
from tidings.app.projections import ReadModel
from tidings.app.service import Service
from tidings.brokers.base import BrokerBase
from tidings.core.urls import redact_url
from tidings.demo.orders import OrderDetails
from tidings.demo.services import (
    ANALYTICS_DB,
    Topics,
    analytics_service,
    create_analytics_table,
    email_service,
)
from tidings.demo.tour.common import WAIT, Tour
from tidings.store import EventStore


class _Consumers:
    """The email and analytics services, started and stopped by name."""

    analytics_db: Path

    async def __aenter__(self) -> _Consumers:
        await self.start("email")
        await self.start("analytics")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for name in ("email", "analytics"):
            await self.stop(name)

    async def start(self, name: str) -> None:
        raise NotImplementedError

    async def stop(self, name: str) -> None:
        raise NotImplementedError

    def where(self, name: str) -> str:
        raise NotImplementedError


class _InProcess(_Consumers):
    """Both services as tasks of this process, on the in-memory broker."""

    def __init__(
        self, broker: BrokerBase, topics: Topics, store: EventStore, folder: Path, tour: Tour
    ) -> None:
        self.broker, self.topics, self.tour = broker, topics, tour
        self.details = ReadModel(store, OrderDetails)
        self.analytics_db = folder / ANALYTICS_DB
        create_analytics_table(self.analytics_db)
        self.inbox = SQLiteInbox(self.analytics_db)
        self.tasks: dict[str, tuple[Service, asyncio.Task[None]]] = {}

    async def __aenter__(self) -> _Consumers:
        await self.inbox.open()
        return await super().__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        await self.inbox.aclose()

    def _sent(self, line: str, retried: bool) -> None:
        self.tour.emails.append(line)
        self.tour.retried += retried

    async def start(self, name: str) -> None:
        if name == "email":
            service = email_service(self.broker, self.topics, self.details, self._sent)
        else:
            service = analytics_service(
                self.broker, self.topics, self.inbox, self.tour.copied.append
            )
        self.tasks[name] = (service, asyncio.create_task(service.run()))

    async def stop(self, name: str) -> None:
        service, task = self.tasks.pop(name)
        service.stop()
        await task

    def where(self, name: str) -> str:
        return "a task of this process, over the in-memory broker"


class _Processes(_Consumers):
    """Each service as a worker process of its own, talking over a real broker."""

    def __init__(
        self, broker_url: str, topics: Topics, store_url: str, folder: Path, tour: Tour
    ) -> None:
        self.broker_url, self.topics, self.tour = broker_url, topics, tour
        self.store_url, self.folder = store_url, folder
        self.analytics_db = folder / ANALYTICS_DB
        create_analytics_table(self.analytics_db)
        self.children: dict[str, tuple[asyncio.subprocess.Process, asyncio.Task[None]]] = {}

    async def start(self, name: str) -> None:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tidings.demo.services",
            name,
            "--broker",
            self.broker_url,
            "--store",
            self.store_url,
            "--folder",
            str(self.folder),
            "--prefix",
            self.topics.prefix,
            stdout=asyncio.subprocess.PIPE,
        )
        ready = asyncio.Event()
        self.children[name] = (child, asyncio.create_task(self._listen(child, ready)))
        self.tour.processes.setdefault(name, []).append(child.pid)
        try:
            async with asyncio.timeout(WAIT):
                await ready.wait()
        except TimeoutError:
            raise TimeoutError(f"the {name} worker process did not start") from None

    async def _listen(self, child: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        assert child.stdout is not None
        async for raw in child.stdout:
            line = json.loads(raw)
            if "ready" in line:
                ready.set()
            elif "email" in line:
                self.tour.emails.append(line["email"])
                self.tour.retried += bool(line["retried"])
            elif "copied" in line:
                self.tour.copied.append(line["copied"])

    async def stop(self, name: str) -> None:
        child, listening = self.children.pop(name)
        if child.returncode is None:
            child.terminate()  # SIGTERM: the service finishes its message and leaves
        try:
            async with asyncio.timeout(WAIT):
                await child.wait()
        except TimeoutError:
            child.kill()
            await child.wait()
        await listening

    def where(self, name: str) -> str:
        pid = self.tour.processes[name][-1]
        return f"worker process {pid}, over {redact_url(self.broker_url)}"
