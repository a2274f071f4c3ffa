"""The hooks that count what flows through tidings and note it on the spans.

`appended` (events appended to a store), `published` (messages sent to a broker),
`consume_span` (a delivery handled by a `Service`: its process span, count and duration) and
`dead_lettered` (a message a consumer group gave up on) both trace and count, so they read
the tracer state of `spans` and the meter state of `metrics` through those modules (where
that state lives). Each keeps its label sets and counters per site (kind of store, broker
and topic, consumer group) so the hot path adds to a cached counter.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from tidings.telemetry import metrics, spans
from tidings.telemetry.metrics import (
    _METRICS,
    APPENDED,
    CONSUMED,
    DEAD_LETTERS,
    PROCESS_DURATION,
    SENT,
    Labels,
    _Cell,
    _labels,
    _otel_attributes,
    meter,
)
from tidings.telemetry.naming import system_of
from tidings.telemetry.spans import _TRACE, NOTHING, tracer

_modules = sys.modules
_clock = time.perf_counter
_NO_DICT: dict[str, Any] = {}

# -- appended events ------------------------------------------------------------------------


def appended(store: object, count: int, span: Any = None, result: Any = None) -> None:
    """Count events appended (and note where they went on the append span)."""
    if (
        metrics._meter is not None
        or (_METRICS in _modules and meter() is not None)
        or metrics._counting
    ):
        site = _append_sites.get(type(store)) or _append_site(store)
        site[0].value += count
        if metrics._meter is not None:
            metrics._meter.appended.add(count, site[1])
    if span is not None and result is not None and span.is_recording():
        span.set_attribute("tidings.stream.version", result.version)
        span.set_attribute("tidings.position", result.position)


_append_sites: dict[type, tuple[_Cell, dict[str, str]]] = {}


def _append_site(store: object) -> tuple[_Cell, dict[str, str]]:
    labels = _labels("db_system", system_of(store))
    site = _append_sites[type(store)] = (APPENDED.cell(labels), _otel_attributes(labels))
    return site


# -- published messages ---------------------------------------------------------------------


def published(broker: object, topic: str, messages: Sequence[Any], span: Any, new: bool) -> None:
    """Count messages sent; on a recording span, name them and give them its context as
    their `traceparent`: all of them when `new`, else those without one."""
    if not messages:
        return
    if (
        metrics._meter is not None
        or (_METRICS in _modules and meter() is not None)
        or metrics._counting
    ):
        site = _send_sites.get((type(broker), topic)) or _send_site(broker, topic)
        site[0].value += len(messages)
        if metrics._meter is not None:
            metrics._meter.sent.add(len(messages), site[1])
    if span is None or not span.is_recording():
        return
    if len(messages) == 1:
        span.set_attribute("messaging.message.id", messages[0].id)
    else:
        span.set_attribute("messaging.batch.message_count", len(messages))
    carrier = spans._otel.inject()
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


# -- consumed deliveries --------------------------------------------------------------------


def _group_labels(delivery: Any) -> Labels:
    """The labels of the consumer group, topic and broker kind `delivery` came through."""
    return _labels(
        "messaging_system",
        system_of(delivery.broker),
        "messaging_destination_name",
        delivery.topic,
        "messaging_consumer_group_name",
        delivery.group,
    )


class _Site:
    """The metrics of one consumer group of one topic of one kind of broker."""

    __slots__ = ("attributes", "consumed", "durations", "labels")

    def __init__(self, delivery: Any) -> None:
        self.labels = _group_labels(delivery)
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
        found = spans._tracer or (_TRACE in _modules and tracer())
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
            context=spans._otel.extract(attributes),
            kind=spans._otel.consumer,
            attributes=span_attributes,
        )
        return self.scope.__enter__()

    def __exit__(self, *exc: Any) -> None:
        elapsed = _clock() - self.started
        if self.scope is not None:
            self.scope.__exit__(*exc)
        if not metrics._counting:
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
        if metrics._meter is not None:
            metrics._meter.consumed.add(1, site.attributes)
            metrics._meter.process_duration.record(elapsed, _otel_attributes(labels))


def consume_span(delivery: Any) -> Any:
    """`process <topic>` around a `Service` handling a delivery, a child of the context in
    the message's `traceparent`; also counts it and times it (`messaging.process.duration`).
    """
    if (
        spans._tracer is not None
        or metrics._meter is not None
        or (_TRACE in _modules and tracer() is not None)
        or (_METRICS in _modules and meter() is not None)
        or metrics._counting
    ):
        return _Consume(delivery)
    return NOTHING


# -- dead letters ---------------------------------------------------------------------------


def dead_lettered(delivery: Any, error: str) -> None:
    """Count a dead letter; mark the current (process) span and the handling as failed."""
    kind = error.split(":", 1)[0].strip() or "error"
    with contextlib.suppress(AttributeError):
        delivery._telemetry_error = kind
    if meter() is not None or metrics._counting:
        _count_dead_letter(delivery)
    if spans._tracer is not None or tracer() is not None:
        span = spans._otel.trace.get_current_span()
        if span.is_recording():
            span.set_attribute("error.type", kind)
            span.set_status(spans._otel.Status(spans._otel.ERROR, error))
            span.add_event("dead_letter", {"tidings.error": error})


def _count_dead_letter(delivery: Any) -> None:
    labels = _group_labels(delivery)
    DEAD_LETTERS.add(labels, 1)
    if metrics._meter is not None:
        metrics._meter.dead_letters.add(1, _otel_attributes(labels))
