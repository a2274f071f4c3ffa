"""OpenTelemetry spans and metrics, and the Prometheus text of `tidings.telemetry`.

The global tracer and meter providers can be set once per process, so this module sets an
SDK provider once, with a sampler the `spans` fixture switches on only for its test (other
tests in the session see non-recording spans: nothing is added to their events). What must
hold without a provider runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import SpanKind

import tidings
from tests.app.orders import OrderPlaced, PlaceOrder, place_order
from tidings import telemetry


class Switch(Sampler):
    """Record every span while `on`, none otherwise."""

    on = False

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: Any = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if not self.on:
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "switch"


SWITCH = Switch()
EXPORTER = InMemorySpanExporter()
READER = InMemoryMetricReader()


def _install() -> None:
    telemetry.enable_metrics()
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(sampler=SWITCH)
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
    if not isinstance(metrics.get_meter_provider(), MeterProvider):
        metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans recorded during the test, in the in-memory exporter."""
    _install()
    EXPORTER.clear()
    SWITCH.on = True
    try:
        yield EXPORTER
    finally:
        SWITCH.on = False
        EXPORTER.clear()


class ShipmentBooked(tidings.Event, type="test.telemetry.shipment_booked"):
    order_id: str


class Totals(tidings.Projection, name="telemetry_totals"):
    @tidings.on(OrderPlaced)
    def placed(self, event: OrderPlaced, record: tidings.RecordedEvent[Any]) -> None:
        self.view.put(event.order_id, {"total": event.total})


def _one(found: list[ReadableSpan], name: str) -> ReadableSpan:
    named = [span for span in found if span.name == name]
    assert len(named) == 1, [span.name for span in found]
    return named[0]


def _traceparent(span: ReadableSpan) -> str:
    assert span.context is not None
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


async def _run_until(service: tidings.Service, done: asyncio.Event) -> None:
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        service.stop()
        await task


async def test_one_order_through_command_store_relay_broker_and_consumer(
    spans: InMemorySpanExporter,
) -> None:
    async with (
        tidings.open_store("memory://") as store,
        tidings.open_broker("memory://") as broker,
    ):
        await broker.declare("orders", "shipping")
        bus = tidings.CommandBus(store, place_order)
        service = tidings.Service("shipping", broker)
        handled = asyncio.Event()

        @service.handler("orders")
        async def book(event: OrderPlaced, ctx: tidings.Context) -> None:
            await store.append(f"shipment-{event.order_id}", [ShipmentBooked(order_id="o-1")])
            handled.set()

        await bus.dispatch(PlaceOrder(order_id="o-1", total=30))
        relay = tidings.OutboxRelay(store, broker, {"test.order.*": "orders"})
        await relay.catch_up()
        await _run_until(service, handled)
        await tidings.ProjectionRunner(store, Totals()).catch_up()
        stored = [record async for record in store.read_stream("order-o-1")]

    found = list(spans.get_finished_spans())
    command = _one(found, "command PlaceOrder")
    append = _one(found, "append order-o-1")
    publish = _one(found, "publish orders")
    process = _one(found, "process orders")
    follow_up = _one(found, "append shipment-o-1")
    project = _one(found, "project telemetry_totals")
    assert command.context is not None and append.context is not None
    assert publish.context is not None and process.context is not None
    trace_id = command.context.trace_id

    # command -> append, one trace; the append's context is in the stored event's metadata
    assert command.parent is None
    assert append.parent is not None and append.parent.span_id == command.context.span_id
    assert append.context.trace_id == trace_id
    assert append.kind is SpanKind.CLIENT
    assert append.attributes is not None
    assert append.attributes["db.system"] == "memory"
    assert append.attributes["db.operation.name"] == "append"
    assert append.attributes["tidings.events.count"] == 1
    assert stored[0].metadata.headers["traceparent"] == _traceparent(append)

    # the relay's publish: its own context (no span around catch_up), linked to the append
    assert publish.kind is SpanKind.PRODUCER
    assert publish.parent is None
    assert [link.context.span_id for link in publish.links] == [append.context.span_id]
    assert publish.attributes == {
        "messaging.system": "memory",
        "messaging.destination.name": "orders",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.message.id": str(stored[0].id),
    }

    # the consumer continues the order's trace from the traceparent the event carried
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is not None and process.parent.span_id == append.context.span_id
    assert process.context.trace_id == trace_id
    assert process.attributes is not None
    assert process.attributes["messaging.consumer.group.name"] == "shipping"
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["messaging.message.id"] == str(stored[0].id)
    assert process.attributes["messaging.message.conversation_id"] == stored[0].correlation_id

    # what the handler appends is a child of the process span, still in the order's trace
    assert follow_up.parent is not None and follow_up.parent.span_id == process.context.span_id
    assert follow_up.context is not None and follow_up.context.trace_id == trace_id

    # the projection's batch links to the traces of the events it applied
    assert project.attributes is not None
    assert project.attributes["messaging.batch.message_count"] == 1
    assert append.context.span_id in [link.context.span_id for link in project.links]


async def test_direct_publish_gives_its_context_and_the_consumer_continues_it(
    spans: InMemorySpanExporter,
) -> None:
    async with tidings.open_broker("memory://") as broker:
        await broker.declare("direct", "g")
        await broker.publish("direct", ShipmentBooked(order_id="x"), key="x")
        async with broker.subscribe("direct", group="g") as deliveries:
            delivery = await anext(aiter(deliveries))
            assert delivery.metadata.headers["traceparent"]
            await delivery.ack()
    publish = _one(list(spans.get_finished_spans()), "publish direct")
    assert delivery.metadata.headers["traceparent"] == _traceparent(publish)


async def test_a_dead_letter_marks_the_process_span_and_is_counted(
    spans: InMemorySpanExporter,
) -> None:
    before = _value(telemetry.prometheus_text(), "tidings_dead_letters_total", "dl-topic")
    async with tidings.open_broker("memory://") as broker:
        await broker.declare("dl-topic", "dl")
        service = tidings.Service("dl", broker)
        failed = asyncio.Event()

        @service.handler("dl-topic", retry=tidings.Retry(attempts=1))
        async def fail(event: ShipmentBooked) -> None:
            failed.set()
            raise ValueError("no")

        await broker.publish("dl-topic", ShipmentBooked(order_id="x"))
        await _run_until(service, failed)  # stopping lets the handling finish
        assert len(await broker.dead_letters("dl-topic")) == 1
    process = _one(list(spans.get_finished_spans()), "process dl-topic")
    assert process.status.status_code is trace.StatusCode.ERROR
    assert process.attributes is not None and process.attributes["error.type"] == "ValueError"
    text = telemetry.prometheus_text()
    assert _value(text, "tidings_dead_letters_total", "dl-topic") == before + 1
    assert re.search(
        r'messaging_process_duration_seconds_count\{[^}]*messaging_destination_name="dl-topic"'
        r'[^}]*error_type="ValueError"\} 1',
        text,
    )


def test_untraced_events_carry_no_traceparent_with_a_provider_that_samples_nothing() -> None:
    _install()
    assert not SWITCH.on

    async def main() -> Any:
        async with tidings.open_store("memory://") as store:
            await store.append("quiet-1", [ShipmentBooked(order_id="q")])
            records = [r async for r in store.read_stream("quiet-1")]
            return records[0]

    record = asyncio.run(main())
    assert "traceparent" not in record.metadata.headers


# -- metrics --------------------------------------------------------------------------------


def _value(text: str, name: str, label_value: str) -> float:
    """The sample of `name` whose labels include `label_value` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and f'="{label_value}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _otel_points(name: str) -> list[Any]:
    data = READER.get_metrics_data()
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        if scope.scope.name == "tidings"
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


async def test_metrics_count_appends_sends_consumption_and_projection_lag() -> None:
    _install()
    before = telemetry.prometheus_text()
    async with (
        tidings.open_store("memory://") as store,
        tidings.open_broker("memory://") as broker,
    ):
        await broker.declare("metered", "m")
        service = tidings.Service("m", broker)
        done = asyncio.Event()

        @service.handler("metered")
        async def handle(event: ShipmentBooked) -> None:
            done.set()

        await store.append(
            "metered-1", [ShipmentBooked(order_id="a"), ShipmentBooked(order_id="b")]
        )
        await broker.publish_many("metered", [ShipmentBooked(order_id="c")])
        await _run_until(service, done)
        await store.commit_projection("metered_projection", 1, 0, 1, {})
        telemetry.observe_projections(await tidings.projection_status(store))

    text = telemetry.prometheus_text()
    assert _value(text, "tidings_store_appended_events_total", "memory") == (
        _value(before, "tidings_store_appended_events_total", "memory") + 2
    )
    assert _value(text, "messaging_client_sent_messages_total", "metered") == 1
    assert _value(text, "messaging_client_consumed_messages_total", "metered") == 1
    assert _value(text, "tidings_projection_lag_events", "metered_projection") == 1
    assert _value(text, "tidings_projection_lag_seconds", "metered_projection") >= 0
    assert "# TYPE messaging_process_duration_seconds histogram\n" in text and re.search(
        r'messaging_process_duration_seconds_bucket\{[^}]*le="\+Inf"\} 1', text
    )

    sent = [
        p for p in _otel_points("messaging.client.sent.messages")
        if p.attributes.get("messaging.destination.name") == "metered"
    ]  # fmt: skip
    assert [p.value for p in sent] == [1]
    assert sent[0].attributes["messaging.system"] == "memory"
    durations = [
        p for p in _otel_points("messaging.process.duration")
        if p.attributes.get("messaging.destination.name") == "metered"
    ]  # fmt: skip
    assert [p.count for p in durations] == [1]
    assert durations[0].attributes["messaging.consumer.group.name"] == "m"
    lag = [
        p for p in _otel_points("tidings.projection.lag.events")
        if p.attributes.get("tidings.projection.name") == "metered_projection"
    ]  # fmt: skip
    assert [p.value for p in lag] == [1]


def test_prometheus_text_is_the_exposition_format() -> None:
    family = telemetry._Family("tidings.test.things", "counter", "{thing}", "Things, for a test.")
    family.add((("topic", 'a "quoted"\\ name\n'),), 3)
    gauge = telemetry._Family("tidings.test.age", "gauge", "s", "Age.")
    gauge.values = {(("name", "x"),): 1.5}
    old = telemetry.FAMILIES
    telemetry.FAMILIES = (family, gauge, telemetry.PROCESS_DURATION)
    try:
        text = telemetry.prometheus_text()
    finally:
        telemetry.FAMILIES = old
    assert text.startswith(
        "# HELP tidings_test_things_total Things, for a test.\n"
        "# TYPE tidings_test_things_total counter\n"
        'tidings_test_things_total{topic="a \\"quoted\\"\\\\ name\\n"} 3\n'
        "# HELP tidings_test_age_seconds Age.\n"
        "# TYPE tidings_test_age_seconds gauge\n"
        'tidings_test_age_seconds{name="x"} 1.5\n'
        "# HELP messaging_process_duration_seconds "
    )
    assert text.endswith("\n")
    for line in text.splitlines():  # every sample line: name{labels} number
        if not line.startswith("#"):
            assert re.fullmatch(r"[a-z_]+(\{.*\})? -?[0-9.e+-]+|[a-z_]+(\{.*\})? \+?Inf", line)


# -- without a provider ---------------------------------------------------------------------

FLOW = """
import asyncio, sys
{prelude}
import tidings
from tests.app.orders import OrderPlaced, PlaceOrder, place_order

class Totals(tidings.Projection, name="totals"):
    @tidings.on(OrderPlaced)
    def placed(self, event, record):
        self.view.put(event.order_id, {{"total": event.total}})

async def main():
    async with tidings.open_store("memory://") as store, tidings.open_broker("memory://") as broker:
        await broker.declare("orders", "g")
        service = tidings.Service("g", broker)
        done = asyncio.Event()

        @service.handler("orders")
        async def on_placed(event: OrderPlaced) -> None:
            done.set()

        await tidings.CommandBus(store, place_order).dispatch(PlaceOrder(order_id="o", total=1))
        await tidings.OutboxRelay(store, broker, "orders").catch_up()
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(done.wait(), 10)
        service.stop()
        await task
        await tidings.ProjectionRunner(store, Totals()).catch_up()
        record = [r async for r in store.read_stream("order-o")][0]
        assert "traceparent" not in record.metadata.headers, record.metadata
asyncio.run(main())
{check}
"""

NOT_CALLED = """
import opentelemetry.trace as trace, opentelemetry.propagate as propagate
import opentelemetry.metrics as metrics
calls = []
def boom(*args, **kwargs):
    calls.append(args)
    raise AssertionError("tidings called into OpenTelemetry without a provider")
for name in ("get_tracer", "get_tracer_provider"):
    setattr(trace, name, boom)
trace.ProxyTracer.start_span = boom
trace.ProxyTracer.start_as_current_span = boom
propagate.inject = propagate.extract = boom
metrics.get_meter = metrics.get_meter_provider = boom
"""


@pytest.mark.parametrize(
    ("prelude", "check"),
    [
        ("", "assert not [m for m in sys.modules if m.startswith('opentelemetry')]; print('ok')"),
        (NOT_CALLED, "assert calls == []; print('ok')"),
    ],
    ids=["api-not-imported", "api-without-provider"],
)
def test_without_a_provider_nothing_calls_into_opentelemetry(prelude: str, check: str) -> None:
    code = FLOW.format(prelude=prelude, check=check)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- the worker's /metrics ------------------------------------------------------------------

APP = """
from tidings import Event, Projection, RecordedEvent, on

class Counted(Event, type="test.telemetry.counted"):
    n: int

class Counts(Projection, name="telemetry_counts"):
    @on(Counted)
    def counted(self, event: Counted, record: RecordedEvent) -> None:
        self.view.put(record.stream_id, {"n": event.n})
"""


async def _get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return head, body


@pytest.mark.slow
async def test_the_worker_serves_metrics_over_http(tmp_path: Path) -> None:
    (tmp_path / "telemetry_app.py").write_text(APP)
    url = f"sqlite:///{tmp_path / 'events.db'}"
    async with tidings.open_store(url) as store:
        await store.append("counted-1", [ShipmentBooked(order_id="x")])
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tidings.cli.main", "worker", "--store", url,
        "--app", "telemetry_app", "--metrics-port", "0",
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        port = None
        async with asyncio.timeout(30):
            while port is None:
                line = (await process.stdout.readline()).decode()
                assert line, (await process.stderr.read()).decode() if process.stderr else ""
                found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
                port = int(found.group(1)) if found else None
            head, body = await _get(port, "/metrics")
            while 'tidings_projection_name="telemetry_counts"' not in body:
                await asyncio.sleep(0.1)  # the first commit of the projection comes soon
                head, body = await _get(port, "/metrics")
            missing, _ = await _get(port, "/nothing")
        assert head.startswith("HTTP/1.0 200 OK")
        assert f"Content-Type: {telemetry.CONTENT_TYPE}" in head
        assert 'tidings_projection_lag_events{tidings_projection_name="telemetry_counts"} 0' in body
        assert "# TYPE messaging_client_sent_messages_total counter" in body
        assert missing.startswith("HTTP/1.0 404")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await process.wait()
    assert process.returncode == 0
