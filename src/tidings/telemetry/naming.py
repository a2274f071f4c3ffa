"""How tidings names itself and the systems it talks to, in its spans and metrics.

The instrumentation scope (`NAME`, `SCHEMA_URL`, the installed version) that the tracer and
the meter are got with, and `system_of`: the `messaging.system` of a broker or the
`db.system` of a store. Spans and metrics both need these, so they live apart from either.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

NAME = "tidings"
SCHEMA_URL = "https://opentelemetry.io/schemas/1.27.0"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tidings")
    except Exception:
        return "0"


def _when_provided(
    api: str, provider: str, from_env: bool, find: Callable[[Any], Any | None]
) -> Any | None:
    """`find(module)` once the OpenTelemetry API module `api` is imported and a provider may
    be set (in its `provider` global, or named in the environment); else None. Finding
    the tracer and the meter, without ever importing OpenTelemetry."""
    module = sys.modules.get(api)
    if module is None or (getattr(module, provider, module) is None and not from_env):
        return None  # the API is not loaded, or no provider is set: nothing can record
    return find(module)


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
            # tidings.store.sqlite -> sqlite; a package's module too: tidings.brokers.kafka.broker
            parts = cls.__module__.split(".")
            if parts[0] == "tidings" and len(parts) > 2 and parts[1] in ("brokers", "store"):
                parts = parts[:3]
            name = _SYSTEMS.get(parts[-1]) or cls.__name__.lower()
        _system_of_class[cls] = name
    return name
