"""AWS's errors: botocore's and aiohttp's failures become one `SQSBrokerError`."""

from __future__ import annotations

from typing import Any

import aiohttp
import botocore.exceptions  # type: ignore[import-untyped]

from tidings.core.errors import BrokerError

_FAILURES = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    aiohttp.ClientError,
    OSError,
    TimeoutError,
)

_GONE = {
    "ReceiptHandleIsInvalid",
    "InvalidParameterValue",
    "AWS.SimpleQueueService.NonExistentQueue",
}


class SQSBrokerError(BrokerError):
    """AWS failed: unreachable after botocore's bounded retries, or it refused a request."""


def _refused(reply: dict[str, Any], what: str) -> None:
    failed = reply.get("Failed") or []
    if failed:
        reasons = sorted({f"{f.get('Code')}: {f.get('Message')}" for f in failed})
        raise SQSBrokerError(f"{what}: {'; '.join(reasons)}")


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code')}: {error.get('Message')}"
    return str(exc) or type(exc).__name__
