"""A demo store, a broker with dead letters, and the console served by uvicorn in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest

pytest.importorskip("starlette", reason="the console needs the console extra (starlette)")
pytest.importorskip("uvicorn", reason="the console needs the console extra (uvicorn)")
pytest.importorskip("jinja2", reason="the console needs the console extra (jinja2)")

import uvicorn

from tidings.brokers import DeadLetter, Message
from tidings.brokers.memory import MemoryBroker
from tidings.console import AppParts, create_app
from tidings.core.codec import JSONCodec
from tidings.core.events import UnknownEvent
from tidings.demo.ledger import LEDGER, Account, AccountBalances, run_ledger
from tidings.store import open_store

T = TypeVar("T")
TOKEN = "test-token-5f2c"
SCRIPT = "<script>window.__pwned = true;</script>"
CORRELATION = "corr-order-42"
ITEMS = 60  # streams item-000 … item-059: more than a page
LONG = 120  # events in the stream `long-1`: more than two pages
ROOM = "room:Main Hall"  # a tag holding a space: searched as tag:"room:Main Hall"
EVIL_TAG = 'label:"><img src=x onerror=alert(1)>'  # a tag is text too


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` in a thread of its own: the browser tests' thread has Playwright's loop."""
    out: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            out.append(asyncio.run(coroutine))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    if errors:
        raise errors[0]
    return out[0]


def event(type: str, **data: Any) -> UnknownEvent:
    return UnknownEvent(type=type, version=1, data=data)


def tagged(type: str, tags: tuple[str, ...], **data: Any) -> UnknownEvent:
    return UnknownEvent(type=type, version=1, data=data, tags=tags)


@dataclass
class Demo:
    url: str
    account_stream: str
    trace_ids: list[str]


async def _fill(url: str) -> Demo:
    async with open_store(url, codec=JSONCodec(LEDGER, keep_unknown=True)) as store:
        ledger = await run_ledger(store)
        for number in range(ITEMS):
            await store.append(
                f"item-{number:03}", [tagged("item.added", ("kind:item",), n=number)]
            )
        await store.append(
            "long-1", [event("tick.counted", n=n, even=n % 2 == 0) for n in range(LONG)]
        )
        await store.append(
            "customer-evil",
            [
                tagged(
                    "customer.renamed",
                    (EVIL_TAG,),
                    name=SCRIPT,
                    note="</pre><img src=x onerror=alert(1)>",
                )
            ],
        )
        # tagged events (dynamic consistency boundaries): found by the tag search
        for course, student in (("c1", "7"), ("c2", "7"), ("c1", "8")):
            await store.append(
                f"student-{student}",
                [
                    tagged(
                        "course.subscribed",
                        (f"course:{course}", f"student:{student}", ROOM),
                        course=course,
                        student=student,
                    )
                ],
            )
        ids: list[str] = []

        async def step(stream: str, type: str, cause: str, **data: Any) -> str:
            await asyncio.sleep(0.02)  # visible spacing on the timeline
            await store.append(
                stream,
                [event(type, **data)],
                metadata={
                    "correlation_id": CORRELATION,
                    "causation_id": cause,
                    "headers": {"origin": f"service {stream.split('-')[0]}"},
                },
            )
            newest = ""
            async for record in store.read_stream(stream, backwards=True, limit=1):
                newest = str(record.id)
            ids.append(newest)
            return newest

        placed = await step("order-42", "order.placed", "cmd-place-42", total_cents=12000)
        requested = await step("payment-42", "payment.requested", placed, amount=12000)
        await step("email-42", "email.sent", placed, to="ada@example.com")
        await step("payment-42", "payment.captured", requested, amount=12000)
        await step("order-42", "order.paid", requested)
    return Demo(url, ledger.stream_id, ids)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    folder = tmp_path_factory.mktemp("console")
    return run(_fill(f"sqlite:///{folder / 'demo.db'}"))


def dead_letter(number: int, data: str = "") -> DeadLetter:
    data = data or f'{{"order_id": "o-{number}"}}'
    message = Message(
        "orders",
        {"id": f"msg-{number}", "type": "order.placed", "source": "tidings"},
        data.encode(),
        f"o-{number}",
        {},
    )
    return DeadLetter(
        f"dl-{number}",
        "orders",
        "email",
        f"LookupError: order o-{number} is not in the read model yet",
        5,
        datetime.now(UTC),
        message,
    )


def make_broker(count: int = 6) -> MemoryBroker:
    broker = MemoryBroker()

    async def fill() -> None:
        await broker.open()
        for number in range(count):
            await broker._add_dead_letter(dead_letter(number))
        await broker._add_dead_letter(dead_letter(99, '{"note": "' + SCRIPT + '"}'))

    run(fill())
    return broker


class Server:
    """The console on 127.0.0.1 and a free port, in a thread; `stop()` ends it."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            ws="none",
            http="h11",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="console", daemon=True)
        self.app = app

    def start(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the console did not start")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the console did not stop"

    def get(self, path: str, **headers: str) -> tuple[int, str, dict[str, str]]:
        return request(self.url + path, headers=headers)

    def post(
        self, path: str, form: dict[str, str] | None = None, **headers: str
    ) -> tuple[int, str, dict[str, str]]:
        from urllib.parse import urlencode

        body = urlencode(form or {}).encode()
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        return request(self.url + path, data=body, headers=headers)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def request(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    """GET (or POST with `data`) without following redirects: status, body, headers."""
    made = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with _opener.open(made, timeout=20) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def parts() -> AppParts:
    return AppParts(
        "tidings.demo.ledger",
        projections={"ledger_balances": AccountBalances()},
        aggregates={"account": Account},
    )


def serve(demo: Demo, *, with_app: bool = True, broker: MemoryBroker | None = None) -> Server:
    app_parts = parts() if with_app else AppParts()
    store = open_store(
        demo.url, codec=JSONCodec(app_parts.registry(), keep_unknown=True), create=False
    )
    app = create_app(
        {"demo.db": store},
        broker if broker is not None else make_broker(),
        TOKEN,
        app_parts,
        broker_label="memory://",
        sample_every=0.5,
    )
    return Server(app).start()


@pytest.fixture(scope="session")
def console(demo: Demo) -> Iterator[Server]:
    server = serve(demo)
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def append_now(url: str, stream: str, *events: UnknownEvent) -> None:
    """Append from this thread, through a store handle of its own (as another process would)."""

    async def go() -> None:
        async with open_store(url, codec=JSONCodec(keep_unknown=True), create=False) as store:
            await store.append(stream, list(events))

    run(go())
