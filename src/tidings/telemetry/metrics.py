"""The metrics: finding tidings' meter, and the metric families kept in process.

Each metric is a `_Family` of values by label set (`_Cell` counters, `_Histogram`
durations, plain gauge values), always kept in process for the Prometheus text form once
`enable_metrics()` (or a real meter provider) turns counting on; `meter()` finds the
OpenTelemetry instruments (`_Instruments`) that mirror them once a real meter provider is
set. `observe_projections` fills the lag gauges. The meter state (`_meter`,
`_metering_off`, `_counting`) lives here and only here.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from tidings.telemetry.naming import NAME, SCHEMA_URL, _version, _when_provided

_METRICS = "opentelemetry.metrics._internal"
_ENV_METER = "OTEL_PYTHON_METER_PROVIDER" in os.environ

# -- finding the meter --------------------------------------------------------------------

_meter: Any = None  # tidings' instruments, once a real meter provider is set
_metering_off = False
_counting = False  # whether metrics are kept (see `enable_metrics`)


def enable_metrics() -> None:
    """Keep tidings' metrics in this process from now on, for `prometheus_text()`.

    `serve_metrics` (so `tidings worker --metrics-port`) and a real OpenTelemetry meter
    provider turn this on; until then no hook counts or times anything."""
    global _counting
    _counting = True


def meter() -> Any | None:
    """tidings' OpenTelemetry instruments when a real meter provider is set, else None."""
    if _meter is not None or _metering_off:
        return _meter  # None once a no-op provider is set for good
    return _when_provided(_METRICS, "_METER_PROVIDER", _ENV_METER, _find_meter)


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


def _reset() -> None:
    """Forget the meter found, and stop counting (tests that swap providers)."""
    global _meter, _metering_off, _counting
    _meter = None
    _metering_off = _counting = False


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


_keys: dict[tuple[Any, ...], Labels] = {}


def _labels(*parts: Any) -> Labels:
    """The label set of `(name, value, name, value, ...)`, made once per distinct set."""
    labels = _keys.get(parts)
    if labels is None:
        labels = _keys[parts] = tuple(zip(parts[::2], parts[1::2], strict=True))
    return labels


def _plain(value: Any) -> float:
    return value.value if isinstance(value, _Cell) else float(value)
