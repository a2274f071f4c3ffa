"""Kafka's errors: aiokafka's failures become one `KafkaBrokerError` with its cause."""

from __future__ import annotations

from aiokafka.errors import (  # type: ignore[import-untyped]
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
)

from tidings.core.errors import BrokerError

_DOWN = (KafkaError, OSError, TimeoutError)
_UNREACHABLE = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, RequestTimedOutError)


class KafkaBrokerError(BrokerError):
    """Kafka failed: unreachable within the bound, or refusing a request."""


def _refused_idempotence(address: str, exc: BaseException) -> KafkaBrokerError:
    """The cluster answered but gave the producer no id (InitProducerId refused)."""
    return KafkaBrokerError(
        f"Kafka at {address} refused an idempotent producer (InitProducerId: "
        f"{type(exc).__name__}); if the cluster does not allow idempotent writes, open "
        f"kafka://{address}?idempotence=false (a retried publish may then be written twice)"
    )


def _error(action: str, exc: BaseException) -> KafkaBrokerError:
    """The one place aiokafka's errors become ours."""
    if isinstance(exc, TimeoutError):
        return KafkaBrokerError(f"{action}: Kafka did not answer in time")
    name, text = type(exc).__name__, str(exc)
    text = text.removeprefix(f"{name}: ").removeprefix(name)  # aiokafka repeats it
    if isinstance(exc, KafkaConnectionError):
        text = f"no broker answered (refused, unknown host or unreachable): {text}"
    return KafkaBrokerError(f"{action}: {name}: {text}".rstrip(": "))
