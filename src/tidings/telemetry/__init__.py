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

The code is split by concern: `spans` (the tracer and the span hooks), `metrics` (the meter,
the in-process metric families, the lag gauges), `counting` (the hooks that count as well as
trace), `prometheus` (the text form and `serve_metrics`) and `naming` (the instrumentation
scope and `system_of`). Use it all through `tidings.telemetry`, which re-exports it.
"""

from __future__ import annotations

from tidings.telemetry import metrics, spans
from tidings.telemetry.counting import appended as appended
from tidings.telemetry.counting import consume_span, dead_lettered, published
from tidings.telemetry.metrics import APPENDED as APPENDED
from tidings.telemetry.metrics import CONSUMED as CONSUMED
from tidings.telemetry.metrics import DEAD_LETTERS as DEAD_LETTERS
from tidings.telemetry.metrics import DURATION_BUCKETS as DURATION_BUCKETS
from tidings.telemetry.metrics import FAMILIES as FAMILIES
from tidings.telemetry.metrics import LAG_EVENTS as LAG_EVENTS
from tidings.telemetry.metrics import LAG_SECONDS as LAG_SECONDS
from tidings.telemetry.metrics import PROCESS_DURATION as PROCESS_DURATION
from tidings.telemetry.metrics import SENT as SENT
from tidings.telemetry.metrics import Labels as Labels
from tidings.telemetry.metrics import _Cell as _Cell
from tidings.telemetry.metrics import _Family as _Family
from tidings.telemetry.metrics import _Histogram as _Histogram
from tidings.telemetry.metrics import enable_metrics, meter, observe_projections
from tidings.telemetry.naming import NAME as NAME
from tidings.telemetry.naming import SCHEMA_URL as SCHEMA_URL
from tidings.telemetry.naming import system_of as system_of
from tidings.telemetry.prometheus import CONTENT_TYPE, prometheus_text, serve_metrics
from tidings.telemetry.spans import MAX_LINKS as MAX_LINKS
from tidings.telemetry.spans import NOTHING as NOTHING
from tidings.telemetry.spans import (
    append_span,
    command_span,
    projection_span,
    publish_records_span,
    publish_span,
    tracer,
)
from tidings.telemetry.spans import traced as traced

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


def _reset() -> None:
    """Forget the tracer and meter found (tests that swap providers)."""
    spans._reset()
    metrics._reset()
