"""The AsyncAPI 3.0 document: the demo's validates against the official AsyncAPI 3.0.0 JSON
Schema (tests/data/asyncapi, from @asyncapi/specs), and says what flows where."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from tidings import ConfigurationError, Event, Service, TypeRegistry
from tidings.asyncapi import Contract, ServiceContract, document
from tidings.brokers.memory import MemoryBroker
from tidings.cli.main import app
from tidings.demo.contracts import ORDERS_CONTRACT
from tidings.demo.orders import OrderPlaced, OrderPlacedNotice

SCHEMA = Path(__file__).parent / "data" / "asyncapi" / "asyncapi-3.0.0.json"


@cache
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def assert_valid(doc: dict[str, Any]) -> None:
    errors = sorted(validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors)
    assert_refs_resolve(doc, doc)


def assert_refs_resolve(doc: dict[str, Any], node: Any) -> None:
    """Every local `$ref` points at something: the schema does not check that."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            target: Any = doc
            for part in ref.removeprefix("#/").split("/"):
                assert isinstance(target, dict) and part in target, f"dangling {ref}"
                target = target[part]
        for value in node.values():
            assert_refs_resolve(doc, value)
    elif isinstance(node, list):
        for value in node:
            assert_refs_resolve(doc, value)


def test_the_validator_refuses_a_broken_document() -> None:
    broken = document(ORDERS_CONTRACT)
    broken["operations"]["email.receive.order-notifications"]["action"] = "publish"  # v2 word
    assert list(validator().iter_errors(broken))


@pytest.mark.parametrize(
    "servers",
    [{}, {"production": "kafka://broker:9092"}, {"dev": "redis://u:secret@localhost:6379/0"}],
    ids=["no server", "kafka (binary, ce_)", "redis (structured)"],
)
@pytest.mark.parametrize("service", [None, "email", "order-notifier"])
def test_the_demo_document_is_valid_asyncapi_3(
    servers: dict[str, str], service: str | None
) -> None:
    assert_valid(document(replace(ORDERS_CONTRACT, servers=servers), service=service))


def test_the_demo_document_says_who_sends_and_receives_what() -> None:
    doc = document(ORDERS_CONTRACT)
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "tidings orders demo"
    assert {cid: c["address"] for cid, c in doc["channels"].items()} == {
        "orders": "orders",
        "order-notifications": "order-notifications",
    }
    flows = {
        (op["x-tidings-service"], op["action"], op["channel"]["$ref"], m["$ref"])
        for op in doc["operations"].values()
        for m in op["messages"]
    }
    whole = "#/channels/orders/messages/order.placed.v2"
    notice = "#/channels/order-notifications/messages/order.placed.v1"
    assert flows == {
        ("orders", "send", "#/channels/orders", whole),
        ("order-notifier", "receive", "#/channels/orders", whole),
        ("order-notifier", "send", "#/channels/order-notifications", notice),
        ("email", "receive", "#/channels/order-notifications", notice),
        ("analytics", "receive", "#/channels/orders", whole),
    }
    # One event type, two shapes (the order service's v2, the notice's v1): two messages.
    messages = doc["components"]["messages"]
    whole_message = messages["order.placed.v2"]
    assert whole_message["name"] == "order.placed"
    assert whole_message["payload"] == {"$ref": "#/components/schemas/OrderPlaced"}
    schemas = doc["components"]["schemas"]
    assert schemas["OrderPlaced"]["required"] == list(OrderPlaced.model_fields)
    assert schemas["OrderPlacedNotice"]["required"] == list(OrderPlacedNotice.model_fields)
    # CloudEvents binary-mode headers, as tidings' brokers write them.
    headers = whole_message["headers"]["properties"]
    assert headers["ce-type"] == {"const": "order.placed", "description": "The event type."}
    assert headers["ce-schemaversion"]["const"] == "2"
    assert headers["content-type"] == {"const": "application/json"}
    assert set(whole_message["headers"]["required"]) >= {"ce-id", "ce-source", "ce-specversion"}


def test_one_service_document_has_only_what_it_uses() -> None:
    doc = document(ORDERS_CONTRACT, service="email")
    assert list(doc["operations"]) == ["email.receive.order-notifications"]
    assert list(doc["channels"]) == ["order-notifications"]
    assert list(doc["components"]["messages"]) == ["order.placed.v1"]  # no clash left
    with pytest.raises(ConfigurationError, match="no service named 'billing'"):
        document(ORDERS_CONTRACT, service="billing")


def test_the_broker_decides_how_cloudevents_travel() -> None:
    kafka = document(replace(ORDERS_CONTRACT, servers={"prod": "kafka://b1:9092"}))
    assert kafka["servers"] == {"prod": {"host": "b1:9092", "protocol": "kafka"}}
    message = kafka["components"]["messages"]["order.placed.v2"]
    assert "ce_type" in message["headers"]["properties"]
    amqp = document(replace(ORDERS_CONTRACT, servers={"prod": "amqp://guest:pw@rabbit/vhost"}))
    assert amqp["servers"]["prod"] == {"host": "rabbit", "protocol": "amqp", "pathname": "/vhost"}
    message = amqp["components"]["messages"]["order.placed.v2"]
    assert "cloudEvents_type" in message["headers"]["properties"]
    redis = document(replace(ORDERS_CONTRACT, servers={"dev": "redis://u:secret@r:6379/0"}))
    assert "secret" not in json.dumps(redis)
    message = redis["components"]["messages"]["order.placed.v2"]
    assert message["contentType"] == "application/cloudevents+json"
    assert "headers" not in message
    envelope = message["payload"]["properties"]
    assert envelope["data"] == {"$ref": "#/components/schemas/OrderPlaced"}
    assert envelope["schemaversion"]["const"] == 2
    with pytest.raises(ConfigurationError, match="carry CloudEvents differently"):
        document(replace(ORDERS_CONTRACT, servers={"a": "kafka://k", "b": "redis://r"}))


# -- richer payloads and services ------------------------------------------------------------

REGISTRY = TypeRegistry()


class Money(BaseModel):
    amount: int
    currency: str = "EUR"


class Card(BaseModel):
    kind: Literal["card"] = "card"
    last4: str


class Transfer(BaseModel):
    kind: Literal["transfer"] = "transfer"
    iban: str


class Paid(Event, type="billing/invoice:paid", version=3, registry=REGISTRY):
    """An invoice was paid."""

    invoice: str
    total: Money
    method: Card | Transfer = Field(discriminator="kind")
    lines: list[Money] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)


class Refunded(Event, type="billing.refunded", registry=REGISTRY):
    invoice: str


def test_nested_models_unions_and_odd_type_names_stay_valid() -> None:
    contract = Contract(
        "billing",
        services=[
            ServiceContract("billing", publishes={"billing.events": [Paid, Refunded]}),
            ServiceContract("ledger", subscribes={"billing.events": []}),  # every message
        ],
    )
    doc = document(contract)
    assert_valid(doc)
    assert "billing_invoice_paid.v3" in doc["components"]["messages"]
    assert {"Money", "Card", "Transfer", "Paid"} <= set(doc["components"]["schemas"])
    assert "messages" not in doc["operations"]["ledger.receive.billing.events"]
    method = doc["components"]["schemas"]["Paid"]["properties"]["method"]
    assert method["discriminator"] == "kind"  # AsyncAPI's form: the property name


OTHER = TypeRegistry()


class RefundedSummary(Event, type="billing.refunded", registry=OTHER):
    """The same type and version as `Refunded`, in another service's shape."""

    invoice: str
    amount: int


def test_two_shapes_of_one_type_and_version_get_a_message_each() -> None:
    contract = Contract(
        "billing",
        services=[
            ServiceContract("billing", publishes={"billing.events": [Refunded]}),
            ServiceContract("audit", subscribes={"billing.events": [RefundedSummary]}),
        ],
    )
    doc = document(contract)
    assert_valid(doc)
    assert set(doc["components"]["messages"]) == {
        "billing.refunded.v1.Refunded",
        "billing.refunded.v1.RefundedSummary",
    }


def test_a_service_contract_from_a_service() -> None:
    service = Service("ledger", MemoryBroker(), registry=REGISTRY)

    @service.handler("billing.events")
    async def paid(event: Paid) -> None: ...

    @service.handler("billing.events", group="ledger-audit")
    async def anything(event: Event) -> None: ...

    part = ServiceContract.of(service, publishes={"ledger": [Refunded]})
    assert part.subscribes == {"billing.events": [Paid, Refunded]}
    assert part.publishes == {"ledger": [Refunded]}
    doc = document(Contract("ledger", services=[part]))
    assert_valid(doc)


def test_a_contract_refuses_what_is_not_an_event_class() -> None:
    with pytest.raises(ConfigurationError, match="not an event class"):
        Contract("x", services=[ServiceContract("a", publishes={"t": [Money]})])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="named twice"):
        Contract("x", services=[ServiceContract("a"), ServiceContract("a")])


# -- the command -----------------------------------------------------------------------------


def test_the_command_writes_the_demo_document(tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.json"
    result = CliRunner().invoke(
        app, ["schema", "asyncapi", "--app", "tidings.demo.contracts", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out}: AsyncAPI 3.0.0, 2 channels, 5 operations\n"
    assert json.loads(out.read_text()) == document(ORDERS_CONTRACT)
    assert_valid(json.loads(out.read_text()))


def test_the_command_writes_yaml_and_to_stdout(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "asyncapi.yaml"
    target = "tidings.demo.contracts:ORDERS_CONTRACT"
    result = CliRunner().invoke(app, ["schema", "asyncapi", "--app", target, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text()) == document(ORDERS_CONTRACT)
    result = CliRunner().invoke(
        app, ["schema", "asyncapi", "--app", target, "-o", "-", "--service", "email"]
    )
    assert json.loads(result.stdout) == document(ORDERS_CONTRACT, service="email")


def test_the_command_names_a_wrong_target() -> None:
    result = CliRunner().invoke(app, ["schema", "asyncapi", "--app", "tidings.demo.orders"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: module tidings.demo.orders holds 0 Contracts")
