"""AsyncAPI 3.0: the application's topics, the events on each, and who sends and receives.

```python
CONTRACT = Contract(
    "Shop",
    version="2.1.0",
    services=[
        ServiceContract("orders", publishes={"orders": [OrderPlaced]}),
        ServiceContract("email", subscribes={"orders": [OrderPlaced]}),
        ServiceContract.of(analytics_service),        # a Service: what its handlers receive
    ],
    topics={"orders": "Every order placed, whole."},
    servers={"production": "kafka://broker-1:9092"},
)
document(CONTRACT)                   # tidings schema asyncapi --app shop.contract:CONTRACT
document(CONTRACT, service="email")  # one service's own document
```

A `Contract` is declared once, next to the event classes, because what a service publishes
is decided at run time (`ctx.publish`, an outbox relay's routes) and cannot be read off the
code. The document maps it so:

- each topic is a channel (its `address` is the topic name);
- each event class on a topic is a message: `name` is the CloudEvents type, `payload` the
  class's JSON Schema (in `components.schemas`, shared between messages), `headers` the
  CloudEvents attributes as the broker carries them: binary mode (`ce-type`, `ce-id`, ...
  with the prefix of the broker's CloudEvents binding: `ce_` for Kafka, `cloudEvents_` for
  AMQP) or, for Redis, SQS and EventBridge, structured mode (the payload is then the whole
  CloudEvent, `data` holding the event);
- each service's publishing is a `send` operation and its subscription a `receive` one,
  named `SERVICE.send.TOPIC` / `SERVICE.receive.TOPIC`, tagged with the service's name
  (`x-tidings-service`, and `x-tidings-group` for the consumer group).

With `service=`, only that service's operations and what they use are written: the
document of one application, as AsyncAPI generators expect.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from tidings.core.errors import ConfigurationError
from tidings.core.events import Event

if TYPE_CHECKING:
    from tidings.app.service import Service

__all__ = ["ASYNCAPI_VERSION", "Contract", "ServiceContract", "document"]

ASYNCAPI_VERSION = "3.0.0"

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_STRUCTURED = {"redis", "rediss", "sqs", "eventbridge"}
_PREFIXES = {"kafka": "ce_", "amqp": "cloudEvents_", "amqps": "cloudEvents_"}


@dataclass(frozen=True)
class ServiceContract:
    """One service's part: the event classes it publishes and subscribes to, per topic."""

    name: str
    publishes: Mapping[str, Sequence[type[Event]]] = field(default_factory=dict)
    """topic -> the event classes the service sends there."""
    subscribes: Mapping[str, Sequence[type[Event]]] = field(default_factory=dict)
    """topic -> the event classes the service receives there (empty: every event on it)."""
    description: str | None = None
    group: str | None = None
    """The consumer group its subscriptions use (default: the service's name)."""

    @classmethod
    def of(
        cls,
        service: Service,
        *,
        publishes: Mapping[str, Sequence[type[Event]]] | None = None,
        description: str | None = None,
    ) -> ServiceContract:
        """The contract of a `Service`: its handlers' topics and event classes (a handler of
        every event contributes its registry's classes, or nothing specific), plus what it
        `publishes`, which handlers do not declare."""
        subscribes: dict[str, list[type[Event]]] = {}
        groups = {h.group for h in service._handlers}
        for handler in service._handlers:
            classes = subscribes.setdefault(handler.topic, [])
            if handler.event is not None:
                found = [handler.event]
            else:
                found = list(service.registry) if service.registry is not None else []
            classes += [c for c in found if c not in classes]
        return cls(
            service.name,
            publishes=dict(publishes or {}),
            subscribes=subscribes,
            description=description,
            group=groups.pop() if len(groups) == 1 else None,
        )


@dataclass(frozen=True)
class Contract:
    """An application's event contract: its services and what flows between them."""

    title: str
    services: Sequence[ServiceContract]
    version: str = "1.0.0"
    """The contract's own version (AsyncAPI's `info.version`)."""
    description: str | None = None
    topics: Mapping[str, str] = field(default_factory=dict)
    """topic -> a description of the channel."""
    servers: Mapping[str, str] = field(default_factory=dict)
    """name -> broker URL (credentials are left out); its scheme also decides how the
    CloudEvents attributes travel (headers and their prefix, or structured mode)."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.services]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"contract {self.title!r}: a service is named twice")
        for service in self.services:
            for topic, classes in (*service.publishes.items(), *service.subscribes.items()):
                for cls in classes:
                    if not (isinstance(cls, type) and issubclass(cls, Event)) or (
                        cls.__event_type__ is None
                    ):
                        raise ConfigurationError(
                            f"contract {self.title!r}: {service.name} on {topic}: {cls!r} is "
                            "not an event class with a type"
                        )


def document(contract: Contract, *, service: str | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of `contract` (of one service with `service=`), as a dict
    ready for `json.dumps`."""
    services = list(contract.services)
    if service is not None:
        services = [s for s in services if s.name == service]
        if not services:
            known = ", ".join(s.name for s in contract.services) or "none"
            raise ConfigurationError(
                f"no service named {service!r} in the contract; known: {known}"
            )
    mode, prefix = _wire(contract)

    # Topics in first-seen order, each with its classes (deduplicated, in order).
    on_topic: dict[str, list[type[Event]]] = {}
    for svc in services:
        for topic, classes in (*svc.publishes.items(), *svc.subscribes.items()):
            listed = on_topic.setdefault(topic, [])
            listed += [c for c in classes if c not in listed]
    classes = list(dict.fromkeys(c for listed in on_topic.values() for c in listed))
    message_ids = _message_ids(classes)
    payloads, schemas = _schemas(classes)

    messages: dict[str, Any] = {}
    for cls in classes:
        messages[message_ids[cls]] = _message(cls, payloads[cls], mode, prefix)
    channels: dict[str, Any] = {}
    for topic, listed in on_topic.items():
        channel: dict[str, Any] = {"address": topic}
        if topic in contract.topics:
            channel["description"] = contract.topics[topic]
        channel["messages"] = {
            message_ids[c]: {"$ref": f"#/components/messages/{message_ids[c]}"} for c in listed
        }
        channels[_safe(topic)] = channel
    operations: dict[str, Any] = {}
    for svc in services:
        for action, per_topic in (("send", svc.publishes), ("receive", svc.subscribes)):
            for topic, used in per_topic.items():
                operations[f"{_safe(svc.name)}.{action}.{_safe(topic)}"] = _operation(
                    svc, action, topic, used, message_ids
                )

    info: dict[str, Any] = {"title": contract.title, "version": contract.version}
    description = contract.description
    if service is not None:
        info["title"] = f"{contract.title}: {service}"
        description = services[0].description or description
    if description:
        info["description"] = description
    doc: dict[str, Any] = {"asyncapi": ASYNCAPI_VERSION, "info": info}
    if contract.servers:
        doc["servers"] = {_safe(name): _server(url) for name, url in contract.servers.items()}
    doc["defaultContentType"] = "application/json"
    doc["channels"] = channels
    doc["operations"] = operations
    location = (
        f"$message.header#/{prefix}correlationid"
        if mode == "binary"
        else "$message.payload#/correlationid"
    )
    doc["components"] = {
        "schemas": schemas,
        "messages": messages,
        "correlationIds": {
            "correlationid": {
                "description": "The correlation id tidings carries through causation chains.",
                "location": location,
            }
        },
    }
    tags = [
        {"name": s.name, **({"description": s.description} if s.description else {})}
        for s in services
    ]
    if tags:
        info["tags"] = tags
    return doc


# -- pieces ----------------------------------------------------------------------------------


def _safe(name: str) -> str:
    """An id AsyncAPI accepts as a key (`[A-Za-z0-9._-]`)."""
    return _SAFE.sub("_", name)


def _wire(contract: Contract) -> tuple[Literal["binary", "structured"], str]:
    """How the CloudEvents attributes travel, from the servers' schemes (binary `ce-`
    headers when none is given)."""
    schemes = {urlsplit(url).scheme.lower() for url in contract.servers.values()}
    if schemes and schemes <= _STRUCTURED:
        return "structured", ""
    prefixes = {_PREFIXES.get(s, "ce-") for s in schemes - _STRUCTURED}
    if len(prefixes) > 1 or (schemes & _STRUCTURED and prefixes):
        raise ConfigurationError(
            f"contract {contract.title!r}: its servers carry CloudEvents differently "
            f"({', '.join(sorted(schemes))}); write one contract per kind of broker"
        )
    return "binary", prefixes.pop() if prefixes else "ce-"


def _server(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if not parts.scheme:
        raise ConfigurationError(f"server {url!r}: write a broker URL, e.g. kafka://host:9092")
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    server: dict[str, Any] = {"host": host or "localhost", "protocol": parts.scheme.lower()}
    if parts.path and parts.path != "/":
        server["pathname"] = parts.path
    return server


def _message_ids(classes: Sequence[type[Event]]) -> dict[type[Event], str]:
    """`order.placed.v1`; classes sharing a type and version (a producer's and a consumer's
    view of one event) get their class name appended so each keeps its own schema."""
    base = {cls: _safe(f"{cls.__event_type__}.v{cls.__event_version__}") for cls in classes}
    counts: dict[str, int] = {}
    for name in base.values():
        counts[name] = counts.get(name, 0) + 1
    ids: dict[type[Event], str] = {}
    for cls, name in base.items():
        ids[cls] = name if counts[name] == 1 else f"{name}.{_safe(cls.__qualname__)}"
    if len(set(ids.values())) != len(ids):
        ids = {cls: f"{ids[cls]}.{_safe(cls.__module__)}" for cls in classes}
    return ids


def _schemas(
    classes: Sequence[type[Event]],
) -> tuple[dict[type[Event], dict[str, Any]], dict[str, Any]]:
    """Each class's payload (a `$ref`) and the shared `components.schemas`."""
    from pydantic.json_schema import models_json_schema

    if not classes:
        return {}, {}
    refs, top = models_json_schema(
        [(cls, "validation") for cls in classes], ref_template="#/components/schemas/{model}"
    )
    defs: dict[str, Any] = top.get("$defs", {})
    renamed = {name: _safe(name) for name in defs}
    schemas = {renamed[name]: _asyncapi_schema(value, renamed) for name, value in defs.items()}
    payloads = {cls: _asyncapi_schema(refs[(cls, "validation")], renamed) for cls in classes}
    return payloads, schemas


def _asyncapi_schema(value: Any, renamed: Mapping[str, str]) -> Any:
    """A pydantic JSON Schema as an AsyncAPI Schema Object: safe `$ref` names, and
    discriminators as the property name (AsyncAPI's form, not OpenAPI's object)."""
    if isinstance(value, list):
        return [_asyncapi_schema(item, renamed) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "$ref" and isinstance(item, str) and item.startswith("#/components/schemas/"):
            name = item.rsplit("/", 1)[-1]
            out[key] = f"#/components/schemas/{renamed.get(name, _safe(name))}"
        elif key == "discriminator" and isinstance(item, dict):
            out[key] = item.get("propertyName", "")
        elif key in ("properties", "$defs", "patternProperties"):
            out[key] = {k: _asyncapi_schema(v, renamed) for k, v in item.items()}
        else:
            out[key] = _asyncapi_schema(item, renamed)
    return out


def _attributes(cls: type[Event]) -> dict[str, dict[str, Any]]:
    """The CloudEvents attributes tidings writes (see `tidings.core.cloudevents`)."""
    text = {"type": "string"}
    return {
        "specversion": {"const": "1.0", "description": "The CloudEvents version."},
        "id": {**text, "description": "The event's id (a UUIDv7): the same on a re-publish."},
        "source": {**text, "description": "Who published it (`tidings` by default)."},
        "type": {"const": cls.__event_type__, "description": "The event type."},
        "subject": {**text, "description": "The stream id (or the key, or the topic)."},
        "time": {**text, "format": "date-time", "description": "When it was recorded."},
        "schemaversion": {
            "const": cls.__event_version__,
            "description": "The version of the event's schema.",
        },
        "streamversion": {"description": "The event's version in its stream (from a store)."},
        "position": {"description": "The event's position in the store's log (from a store)."},
        "correlationid": {**text, "description": "The correlation id of the whole flow."},
        "causationid": {**text, "description": "The id of the event or command that caused it."},
        "partitionkey": {**text, "description": "The ordering key (CloudEvents partitioning)."},
    }


_REQUIRED = ["specversion", "id", "source", "type", "subject", "time", "schemaversion"]


def _message(cls: type[Event], payload: dict[str, Any], mode: str, prefix: str) -> dict[str, Any]:
    attributes = _attributes(cls)
    message: dict[str, Any] = {"name": cls.__event_type__, "title": cls.__name__}
    doc = (cls.__doc__ or "").strip()
    if doc and cls.__doc__ is not Event.__doc__:
        message["summary"] = doc.splitlines()[0]
    if mode == "binary":
        headers: dict[str, Any] = {}
        for name, schema in attributes.items():
            if "const" in schema:  # headers are text on the wire
                schema = {**schema, "const": str(schema["const"])}
            elif name in ("streamversion", "position"):
                schema = {**schema, "type": "string", "pattern": "^[0-9]+$"}
            headers[f"{prefix}{name}"] = schema
        headers["content-type"] = {"const": "application/json"}
        message["contentType"] = "application/json"
        message["headers"] = {
            "type": "object",
            "properties": headers,
            "required": [f"{prefix}{name}" for name in _REQUIRED] + ["content-type"],
        }
        message["payload"] = payload
    else:
        envelope = {
            name: (
                {**schema, "type": "integer", "minimum": 0}
                if name in ("streamversion", "position")
                else schema
            )
            for name, schema in attributes.items()
        }
        envelope["datacontenttype"] = {"const": "application/json"}
        envelope["data"] = payload
        message["contentType"] = "application/cloudevents+json"
        message["payload"] = {
            "type": "object",
            "properties": envelope,
            "required": [*_REQUIRED, "data"],
        }
    message["correlationId"] = {"$ref": "#/components/correlationIds/correlationid"}
    return message


def _operation(
    service: ServiceContract,
    action: str,
    topic: str,
    classes: Sequence[type[Event]],
    message_ids: Mapping[type[Event], str],
) -> dict[str, Any]:
    channel = _safe(topic)
    types = ", ".join(f"{c.__event_type__} v{c.__event_version__}" for c in classes)
    verb = "publishes" if action == "send" else "receives"
    operation: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": f"{service.name} {verb} {types or 'every event'} on {topic}",
    }
    if classes:
        operation["messages"] = [
            {"$ref": f"#/channels/{channel}/messages/{message_ids[c]}"} for c in classes
        ]
    operation["tags"] = [{"name": service.name}]
    operation["x-tidings-service"] = service.name
    if action == "receive":
        operation["x-tidings-group"] = service.group or service.name
    return operation
