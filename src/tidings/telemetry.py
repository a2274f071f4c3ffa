"""OpenTelemetry spans and metrics for tidings, and the Prometheus text form of its metrics.

Only the OpenTelemetry API is used (the `otel` extra: `opentelemetry-api`); which SDK and
exporters run is the application's choice. Nothing here imports OpenTelemetry: tidings only
looks at the API once the application has imported it, and traces once a real tracer
provider is set (`trace.set_tracer_provider(TracerProvider(...))`). Until then each hook
costs a dictionary lookup.

Spans, after OpenTelemetry's messaging semantic conventions:

- `command PlaceOrder` (INTERNAL): a command handled by a `CommandBus`;
- `append order-1` (CLIENT, `db.system`, `db.operation.name=append`): a store append,
  a child of what runs it; its context goes into the appended events' metadata as the W3C
  `traceparent` (and `tracestate`) headers, which travel with the events to brokers as
  CloudEvents extension attributes (the CloudEvents distributed tracing extension);
- `publish orders` (PRODUCER, `messaging.operation.type=send`): a publish. New events get
  the publish span's context as their `traceparent`; stored events (the outbox relay's
  `publish_records`) keep the one their append gave them, and the publish span links to it;
- `process orders` (CONSUMER, `messaging.operation.type=process`): a `Service` handling a
  delivery, a child of the `traceparent` the message carries, so one trace follows an order
  from its command through the store, the relay and the broker to each consumer;
- `project orders_by_user` (INTERNAL): a projection applying and committing one batch,
  linked to the traces of (up to 32 of) its events.

Metrics (OpenTelemetry instruments once a real meter provider is set, and always kept in
process for `prometheus_text()`, the `/metrics` of `tidings worker --metrics-port` and the
console): `messaging.client.sent.messages`, `messaging.client.consumed.messages`,
`messaging.process.duration` (seconds), `tidings.store.appended.events`,
`tidings.dead_letters`, and the gauges `tidings.projection.lag.events` and
`tidings.projection.lag.seconds` (from `observe_projections(projection_status(...))`).
Per-second rates are the counters' rates (`rate(...[1m])` in PromQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from tidings.core.metadata import Metadata

__all__ = [
    "CONTENT_TYPE",
    "append_span",
    "command_span",
    "consume_span",
    "dead_lettered",
    "enable_metrics",
    "meter",
    "observe_projections",
    "projection_span",
    "prometheus_text",
    "publish_records_span",
    "publish_span",
    "published",
    "serve_metrics",
    "tracer",
]

log = logging.getLogger("tidings.telemetry")

NAME = "tidings"
SCHEMA_URL = "https://opentelemetry.io/schemas/1.27.0"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format's content type."""
MAX_LINKS = 32  # links from one publish or projection span to the traces of its events

_TRACE = "opentelemetry.trace"
_METRICS = "opentelemetry.metrics._internal"
_modules = sys.modules
_clock = time.perf_counter
_NO_DICT: dict[str, Any] = {}
_ENV_TRACER = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
_ENV_METER = "OTEL_PYTHON_METER_PROVIDER" in os.environ

# -- finding the tracer and the meter -----------------------------------------------------

_tracer: Any = None  # tidings' tracer, once a real provider is set
_tracing_off = False  # a no-op provider is set for good
_otel: Any = None  # what tracing uses of the API, found with the tracer
_meter: Any = None  # tidings' instruments, once a real meter provider is set
_metering_off = False
_counting = False  # whether metrics are kept (see `enable_metrics`)


def tracer() -> Any | None:
    """tidings' tracer when a real tracer provider is set, else None (nothing to trace)."""
    if _tracer is not None:
        return _tracer
    if _tracing_off:
        return None
    module = sys.modules.get(_TRACE)
    if module is None or (getattr(module, "_TRACER_PROVIDER", module) is None and not _ENV_TRACER):
        return None  # the API is not loaded, or no provider is set: nothing can record
    return _find_tracer(module)


def _find_tracer(module: Any) -> Any | None:
    global _tracer, _tracing_off, _otel
    provider = module.get_tracer_provider()
    if isinstance(provider, module.ProxyTracerProvider):
        return None
    if isinstance(provider, module.NoOpTracerProvider):
        _tracing_off = True  # a provider is set once: this one never records
        return None
    from opentelemetry import propagate

    _otel = _Otel(module, propagate)
    _tracer = provider.get_tracer(NAME, _version(), schema_url=SCHEMA_URL)
    return _tracer


class _Otel:
    """The parts of the API the spans use, looked up once."""

    def __init__(self, trace: Any, propagate: Any) -> None:
        self.trace = trace
        self.propagate = propagate
        self.internal = trace.SpanKind.INTERNAL
        self.client = trace.SpanKind.CLIENT
        self.producer = trace.SpanKind.PRODUCER
        self.consumer = trace.SpanKind.CONSUMER
        self.Link = trace.Link
        self.error = trace.Status(trace.StatusCode.ERROR)
        self.Status = trace.Status
        self.ERROR = trace.StatusCode.ERROR

    def extract(self, carrier: Mapping[str, Any]) -> Any:
        """The context a message's `traceparent` (and `tracestate`) names, or None."""
        parent = carrier.get("traceparent")
        if not parent:
            return None
        found = {"traceparent": str(parent)}
        state = carrier.get("tracestate")
        if state:
            found["tracestate"] = str(state)
        return self.propagate.extract(found)

    def link(self, carrier: Mapping[str, Any]) -> Any:
        context = self.extract(carrier)
        if context is None:
            return None
        span_context = self.trace.get_current_span(context).get_span_context()
        return self.Link(span_context) if span_context.is_valid else None

    def links(self, carriers: Iterable[Mapping[str, Any]]) -> list[Any]:
        out: list[Any] = []
        seen: set[Any] = set()
        for carrier in carriers:
            if len(out) >= MAX_LINKS:
                break
            parent = carrier.get("traceparent")
            if parent and parent not in seen:
                seen.add(parent)
                link = self.link(carrier)
                if link is not None:
                    out.append(link)
        return out

    def inject(self) -> dict[str, str]:
        """The current context as `traceparent` (and `tracestate`) headers."""
        carrier: dict[str, str] = {}
        self.propagate.inject(carrier)
        return {k: v for k, v in carrier.items() if k in ("traceparent", "tracestate")}


def enable_metrics() -> None:
    """Keep tidings' metrics in this process from now on, for `prometheus_text()`.

    `serve_metrics` (so `tidings worker --metrics-port`) and a real OpenTelemetry meter
    provider turn this on; until then no hook counts or times anything."""
    global _counting
    _counting = True


def meter() -> Any | None:
    """tidings' OpenTelemetry instruments when a real meter provider is set, else None."""
    if _meter is not None:
        return _meter
    if _metering_off:
        return None
    module = sys.modules.get(_METRICS)
    if module is None or (getattr(module, "_METER_PROVIDER", module) is None and not _ENV_METER):
        return None
    return _find_meter(module)


def _find_meter(module: Any) -> Any | None:
    global _meter, _metering_off
    provider = module.get_meter_provider()
    if isinstance(provider, module._ProxyMeterProvider):
        return None
    if isinstance(provider, module.NoOpMeterProvider):
        _metering_off = True
        return None
    _meter = _Instruments(provider.get_meter(NAME, _version(), schema_url=SCHEMA_URL))
    enable_metrics()
    return _meter


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tidings")
    except Exception:
        return "0"


def _reset() -> None:
    """Forget the tracer and meter found (tests that swap providers)."""
    global _tracer, _tracing_off, _otel, _meter, _metering_off, _counting
    _tracer = _otel = _meter = None
    _tracing_off = _metering_off = _counting = False


# -- in-process metrics, for the Prometheus text form -------------------------------------

Labels = tuple[tuple[str, str], ...]
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
"""Seconds: the semantic conventions' advice for `messaging.process.duration`."""


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, value)] += 1
        self.sum += value


class _Family:
    """One metric and its values by label set."""

    def __init__(self, otel_name: str, kind: str, unit: str, help: str) -> None:
        self.otel_name = otel_name
        self.kind = kind  # counter, gauge or histogram
        self.unit = unit
        self.help = help
        base = otel_name.replace(".", "_")
        if unit == "s" and not base.endswith("_seconds"):
            base += "_seconds"
        self.name = base + ("_total" if kind == "counter" else "")
        self.values: dict[Labels, Any] = {}

    def cell(self, labels: Labels) -> _Cell:
        """The counter of one label set (kept: hot paths add to it directly)."""
        found = self.values.get(labels)
        if found is None:
            found = self.values[labels] = _Cell()
        return found

    def add(self, labels: Labels, amount: float) -> None:
        self.cell(labels).value += amount

    def histogram(self, labels: Labels) -> _Histogram:
        found = self.values.get(labels)
        if found is None:
            found = self.values[labels] = _Histogram()
        return found


class _Cell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0


SENT = _Family(
    "messaging.client.sent.messages", "counter", "{message}", "Messages sent to brokers."
)
CONSUMED = _Family(
    "messaging.client.consumed.messages",
    "counter",
    "{message}",
    "Messages delivered to consumers (services).",
)
PROCESS_DURATION = _Family(
    "messaging.process.duration", "histogram", "s", "How long handling one delivery took."
)
APPENDED = _Family(
    "tidings.store.appended.events", "counter", "{event}", "Events appended to the store."
)
DEAD_LETTERS = _Family(
    "tidings.dead_letters", "counter", "{message}", "Messages a consumer group gave up on."
)
LAG_EVENTS = _Family(
    "tidings.projection.lag.events",
    "gauge",
    "{event}",
    "Events in the log past a projection's (or outbox relay's) checkpoint.",
)
LAG_SECONDS = _Family(
    "tidings.projection.lag.seconds",
    "gauge",
    "s",
    "Age of the oldest event a projection (or outbox relay) has not applied yet.",
)
FAMILIES = (SENT, CONSUMED, PROCESS_DURATION, APPENDED, DEAD_LETTERS, LAG_EVENTS, LAG_SECONDS)


class _Instruments:
    """The OpenTelemetry instruments mirroring the families."""

    def __init__(self, otel_meter: Any) -> None:
        def counter(family: _Family) -> Any:
            return otel_meter.create_counter(
                family.otel_name, unit=family.unit, description=family.help
            )

        self.sent = counter(SENT)
        self.consumed = counter(CONSUMED)
        self.appended = counter(APPENDED)
        self.dead_letters = counter(DEAD_LETTERS)
        self.process_duration = otel_meter.create_histogram(
            PROCESS_DURATION.otel_name,
            unit="s",
            description=PROCESS_DURATION.help,
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        for family in (LAG_EVENTS, LAG_SECONDS):
            otel_meter.create_observable_gauge(
                family.otel_name,
                callbacks=[_observer(family)],
                unit=family.unit,
                description=family.help,
            )


def _observer(family: _Family) -> Callable[[Any], list[Any]]:
    def observe(options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        return [
            Observation(_plain(value), _otel_attributes(labels))
            for labels, value in family.values.items()
        ]

    return observe


_attributes: dict[Labels, dict[str, str]] = {}


def _otel_attributes(labels: Labels) -> dict[str, str]:
    """The OpenTelemetry attributes of a label set (cached: the sets are few)."""
    found = _attributes.get(labels)
    if found is None:
        found = _attributes[labels] = {k.replace("_", "."): v for k, v in labels}
    return found


def observe_projections(statuses: Iterable[Any]) -> None:
    """Keep the lag of each projection (the `ProjectionStatus` list of `projection_status`)
    for the lag gauges; the outbox relays' checkpoints (`outbox:NAME`) are among them."""
    events: dict[Labels, Any] = {}
    seconds: dict[Labels, Any] = {}
    for status in statuses:
        labels = (("tidings_projection_name", str(status.name)),)
        events[labels] = int(status.lag_events)
        seconds[labels] = float(status.lag_seconds)
    LAG_EVENTS.values = events
    LAG_SECONDS.values = seconds


# -- where systems are named ------------------------------------------------------------

_SYSTEMS = {
    "memory": "memory",
    "redis": "redis",
    "rabbitmq": "rabbitmq",
    "nats": "nats",
    "kafka": "kafka",
    "sqs": "aws_sqs",
    "sqlite": "sqlite",
    "postgres": "postgresql",
}
_system_of_class: dict[type, str] = {}


def system_of(thing: object) -> str:
    """`messaging.system` of a broker or `db.system` of a store: from its module's name, or
    its class's `telemetry_system` attribute."""
    cls = type(thing)
    name = _system_of_class.get(cls)
    if name is None:
        name = getattr(cls, "telemetry_system", None)
        if not isinstance(name, str):
            last = cls.__module__.rsplit(".", 1)[-1]
            name = _SYSTEMS.get(last) or cls.__name__.lower()
        _system_of_class[cls] = name
    return name


_keys: dict[tuple[Any, ...], Labels] = {}


def _labels(*parts: Any) -> Labels:
    """The label set of `(name, value, name, value, ...)`, made once per distinct set."""
    labels = _keys.get(parts)
    if labels is None:
        labels = _keys[parts] = tuple(zip(parts[::2], parts[1::2], strict=True))
    return labels


# -- spans --------------------------------------------------------------------------------


class _Nothing:
    """The context manager of a hook when nothing is traced: enters as None."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


NOTHING = _Nothing()


def command_span(command: Any, correlation_id: str) -> Any:
    """`command <Type>` around a command's handler (`CommandBus.dispatch`)."""
    found = _tracer or (_TRACE in _modules and tracer())
    if not found:
        return NOTHING
    name = type(command).__name__
    return found.start_as_current_span(
        f"command {name}",
        kind=_otel.internal,
        attributes={
            "tidings.command.type": name,
            "tidings.command.id": str(command.command_id),
            "messaging.message.conversation_id": correlation_id,
        },
    )


def append_span(store: object, stream_id: str, count: int) -> Any:
    """`append <stream>` around a store append; enters as the span (None untraced)."""
    found = _tracer or (_TRACE in _modules and tracer())
    if not found:
        return NOTHING
    system = system_of(store)
    return found.start_as_current_span(
        f"append {stream_id}",
        kind=_otel.client,
        attributes={
            "db.system": system,
            "db.system.name": system,
            "db.operation.name": "append",
            "tidings.stream.id": stream_id,
            "tidings.events.count": count,
        },
    )


def traced(metadata: Metadata, span: Any) -> Metadata:
    """`metadata` with the W3C `traceparent` (and `tracestate`) of the current (append) span
    among its headers, when `span` records; else `metadata` itself."""
    if span is None or not span.is_recording():
        return metadata
    carrier = _otel.inject()
    if not carrier:
        return metadata
    return Metadata(metadata.correlation_id, metadata.causation_id, {**metadata.headers, **carrier})


def appended(store: object, count: int, span: Any = None, result: Any = None) -> None:
    """Count events appended (and note where they went on the append span)."""
    if _meter is not None or (_METRICS in _modules and meter() is not None) or _counting:
        site = _append_sites.get(type(store)) or _append_site(store)
        site[0].value += count
        if _meter is not None:
            _meter.appended.add(count, site[1])
    if span is not None and result is not None and span.is_recording():
        span.set_attribute("tidings.stream.version", result.version)
        span.set_attribute("tidings.position", result.position)


_append_sites: dict[type, tuple[_Cell, dict[str, str]]] = {}


def _append_site(store: object) -> tuple[_Cell, dict[str, str]]:
    labels = _labels("db_system", system_of(store))
    site = _append_sites[type(store)] = (APPENDED.cell(labels), _otel_attributes(labels))
    return site


def publish_span(broker: object, topic: str) -> Any:
    """`publish <topic>` around publishing new events; enters as the span (None untraced)."""
    found = _tracer or (_TRACE in _modules and tracer())
    if not found:
        return NOTHING
    return found.start_as_current_span(
        f"publish {topic}", kind=_otel.producer, attributes=_publish_attributes(broker, topic)
    )


def publish_records_span(broker: object, topic: str, records: Iterable[Any]) -> Any:
    """`publish <topic>` for stored events (the outbox relay): a child of the current
    context, linked to the contexts their appends gave them."""
    found = _tracer or (_TRACE in _modules and tracer())
    if not found:
        return NOTHING
    return found.start_as_current_span(
        f"publish {topic}",
        kind=_otel.producer,
        attributes=_publish_attributes(broker, topic),
        links=_otel.links(record.metadata.headers for record in records),
    )


def _publish_attributes(broker: object, topic: str) -> dict[str, Any]:
    return {
        "messaging.system": system_of(broker),
        "messaging.destination.name": topic,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
    }


def published(broker: object, topic: str, messages: Sequence[Any], span: Any, new: bool) -> None:
    """Count messages sent; on a recording span, name them and give them its context as
    their `traceparent`: all of them when `new`, else those without one."""
    if not messages:
        return
    if _meter is not None or (_METRICS in _modules and meter() is not None) or _counting:
        site = _send_sites.get((type(broker), topic)) or _send_site(broker, topic)
        site[0].value += len(messages)
        if _meter is not None:
            _meter.sent.add(len(messages), site[1])
    if span is None or not span.is_recording():
        return
    if len(messages) == 1:
        span.set_attribute("messaging.message.id", messages[0].id)
    else:
        span.set_attribute("messaging.batch.message_count", len(messages))
    carrier = _otel.inject()
    for message in messages:
        attributes = message.attributes
        if (new or "traceparent" not in attributes) and isinstance(attributes, dict):
            attributes.pop("tracestate", None)
            attributes.update(carrier)


_send_sites: dict[tuple[type, str], tuple[_Cell, dict[str, str]]] = {}


def _send_site(broker: object, topic: str) -> tuple[_Cell, dict[str, str]]:
    labels = _labels(
        "messaging_system",
        system_of(broker),
        "messaging_destination_name",
        topic,
        "messaging_operation_name",
        "publish",
    )
    site = _send_sites[type(broker), topic] = (SENT.cell(labels), _otel_attributes(labels))
    return site


class _Site:
    """The metrics of one consumer group of one topic of one kind of broker."""

    __slots__ = ("attributes", "consumed", "durations", "labels")

    def __init__(self, delivery: Any) -> None:
        self.labels = _labels(
            "messaging_system",
            system_of(delivery.broker),
            "messaging_destination_name",
            delivery.topic,
            "messaging_consumer_group_name",
            delivery.group,
        )
        self.attributes = _otel_attributes(self.labels)
        self.consumed = CONSUMED.cell(self.labels)
        self.durations = PROCESS_DURATION.histogram(self.labels)


_consume_sites: dict[tuple[type, str, str], _Site] = {}


def _consume_site(delivery: Any) -> _Site:
    site = _consume_sites[type(delivery.broker), delivery.topic, delivery.group] = _Site(delivery)
    return site


class _Consume:
    """Around a delivery's handling: the process span, its duration and its count."""

    __slots__ = ("delivery", "group", "scope", "started")

    def __init__(self, delivery: Any) -> None:
        self.delivery = delivery
        self.scope: Any = None

    def __enter__(self) -> Any:
        self.started = _clock()
        found = _tracer or (_TRACE in _modules and tracer())
        if not found:
            return None
        delivery = self.delivery
        message = delivery.message
        attributes = message.attributes
        span_attributes = {
            "messaging.system": system_of(delivery.broker),
            "messaging.destination.name": delivery.topic,
            "messaging.consumer.group.name": delivery.group,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.id": message.id,
            "tidings.event.type": message.type,
            "tidings.delivery.attempt": delivery.attempt,
        }
        correlation = attributes.get("correlationid")
        if correlation:
            span_attributes["messaging.message.conversation_id"] = str(correlation)
        self.scope = found.start_as_current_span(
            f"process {delivery.topic}",
            context=_otel.extract(attributes),
            kind=_otel.consumer,
            attributes=span_attributes,
        )
        return self.scope.__enter__()

    def __exit__(self, *exc: Any) -> None:
        elapsed = _clock() - self.started
        if self.scope is not None:
            self.scope.__exit__(*exc)
        if not _counting:
            return
        delivery = self.delivery
        site = _consume_sites.get(
            (type(delivery.broker), delivery.topic, delivery.group)
        ) or _consume_site(delivery)
        site.consumed.value += 1
        error = getattr(delivery, "__dict__", _NO_DICT).get("_telemetry_error")
        if exc[0] is not None:
            error = exc[0].__name__
        if error is None:
            site.durations.observe(elapsed)
            labels = site.labels
        else:
            labels = (*site.labels, ("error_type", error))
            PROCESS_DURATION.histogram(labels).observe(elapsed)
        if _meter is not None:
            _meter.consumed.add(1, site.attributes)
            _meter.process_duration.record(elapsed, _otel_attributes(labels))


def consume_span(delivery: Any) -> Any:
    """`process <topic>` around a `Service` handling a delivery, a child of the context in
    the message's `traceparent`; also counts it and times it (`messaging.process.duration`).
    """
    if (
        _tracer is not None
        or _meter is not None
        or (_TRACE in _modules and tracer() is not None)
        or (_METRICS in _modules and meter() is not None)
        or _counting
    ):
        return _Consume(delivery)
    return NOTHING


def dead_lettered(delivery: Any, error: str) -> None:
    """Count a dead letter; mark the current (process) span and the handling as failed."""
    kind = error.split(":", 1)[0].strip() or "error"
    with contextlib.suppress(AttributeError):
        delivery._telemetry_error = kind
    if meter() is not None or _counting:
        _count_dead_letter(delivery)
    if _tracer is not None or tracer() is not None:
        span = _otel.trace.get_current_span()
        if span.is_recording():
            span.set_attribute("error.type", kind)
            span.set_status(_otel.Status(_otel.ERROR, error))
            span.add_event("dead_letter", {"tidings.error": error})


def _count_dead_letter(delivery: Any) -> None:
    labels = _labels(
        "messaging_system",
        system_of(delivery.broker),
        "messaging_destination_name",
        delivery.topic,
        "messaging_consumer_group_name",
        delivery.group,
    )
    DEAD_LETTERS.add(labels, 1)
    if _meter is not None:
        _meter.dead_letters.add(1, _otel_attributes(labels))


def projection_span(name: str, records: Sequence[Any], scanned_to: int) -> Any:
    """`project <name>` around applying and committing one batch of a projection."""
    found = _tracer or (_TRACE in _modules and tracer())
    if not found:
        return NOTHING
    return found.start_as_current_span(
        f"project {name}",
        kind=_otel.internal,
        attributes={
            "tidings.projection.name": name,
            "messaging.batch.message_count": len(records),
            "tidings.projection.position": scanned_to,
        },
        links=_otel.links(record.metadata.headers for record in records),
    )


# -- the Prometheus text form -------------------------------------------------------------


def prometheus_text() -> str:
    """tidings' metrics in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for family in FAMILIES:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in sorted(family.values.items()):
            if family.kind != "histogram":
                lines.append(f"{family.name}{_render(labels)} {_number(_plain(value))}")
                continue
            cumulative = 0
            for bound, count in zip((*DURATION_BUCKETS, None), value.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound is None else _number(bound)
                lines.append(f"{family.name}_bucket{_render((*labels, ('le', le)))} {cumulative}")
            lines.append(f"{family.name}_sum{_render(labels)} {_number(value.sum)}")
            lines.append(f"{family.name}_count{_render(labels)} {cumulative}")
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> float:
    return value.value if isinstance(value, _Cell) else float(value)


def _render(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{name}="{_escape(value)}"' for name, value in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


# -- a /metrics endpoint ------------------------------------------------------------------


async def serve_metrics(
    host: str = "127.0.0.1",
    port: int = 0,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> asyncio.Server:
    """Serve `prometheus_text()` at `http://host:port/metrics` (a tiny HTTP/1.0 server);
    `refresh` runs before each scrape (to update the projection lag, say). Close the
    returned server to stop it; `server.sockets[0].getsockname()[1]` is the port."""
    enable_metrics()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # the headers: not needed
                parts = request.split()
                method = parts[0] if parts else b""
                path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
                if method in (b"GET", b"HEAD") and path == b"/metrics":
                    if refresh is not None:
                        try:
                            await refresh()
                        except Exception as exc:  # stale lag beats no metrics
                            log.warning("metrics: refresh failed: %s", exc)
                    status, kind, body = "200 OK", CONTENT_TYPE, prometheus_text().encode()
                else:
                    status, kind, body = "404 Not Found", "text/plain", b"not found\n"
                head = (
                    f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode()
                writer.write(head if method == b"HEAD" else head + body)
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(answer, host, port)
