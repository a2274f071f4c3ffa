"""The spans: finding tidings' tracer, and the hooks that start its spans.

`tracer()` finds the tracer once a real tracer provider is set (and never imports
OpenTelemetry itself); `command_span`, `append_span`, `publish_span`,
`publish_records_span` and `projection_span` start the spans named in `tidings.telemetry`,
and `traced` puts the append span's W3C `traceparent` into the events' metadata. The tracer
state (`_tracer`, `_tracing_off`, `_otel`) lives here and only here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tidings.core.metadata import Metadata
from tidings.telemetry.naming import NAME, SCHEMA_URL, _version, _when_provided, system_of

MAX_LINKS = 32  # links from one publish or projection span to the traces of its events

_TRACE = "opentelemetry.trace"
_modules = sys.modules
_ENV_TRACER = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ

# -- finding the tracer -------------------------------------------------------------------

_tracer: Any = None  # tidings' tracer, once a real provider is set
_tracing_off = False  # a no-op provider is set for good
_otel: Any = None  # what tracing uses of the API, found with the tracer


def tracer() -> Any | None:
    """tidings' tracer when a real tracer provider is set, else None (nothing to trace)."""
    if _tracer is not None or _tracing_off:
        return _tracer  # None once a no-op provider is set for good
    return _when_provided(_TRACE, "_TRACER_PROVIDER", _ENV_TRACER, _find_tracer)


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


def _reset() -> None:
    """Forget the tracer found (tests that swap providers)."""
    global _tracer, _tracing_off, _otel
    _tracer = _otel = None
    _tracing_off = False


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


def publish_span(broker: object, topic: str) -> Any:
    """`publish <topic>` around publishing new events; enters as the span (None untraced)."""
    return _publish_span(broker, topic, None)


def publish_records_span(broker: object, topic: str, records: Iterable[Any]) -> Any:
    """`publish <topic>` for stored events (the outbox relay): a child of the current
    context, linked to the contexts their appends gave them."""
    return _publish_span(broker, topic, records)


def _publish_span(broker: object, topic: str, records: Iterable[Any] | None) -> Any:
    """Both publish spans: linked to the records' traces when there are records."""
    found = _tracer or (_TRACE in _modules and tracer())
    if not found:
        return NOTHING
    attributes = {
        "messaging.system": system_of(broker),
        "messaging.destination.name": topic,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
    }
    links = None if records is None else _otel.links(r.metadata.headers for r in records)
    return found.start_as_current_span(
        f"publish {topic}", kind=_otel.producer, attributes=attributes, links=links
    )


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
