"""Upcasters: old versions of an event read as the newest, wherever events are decoded.

```python
class Deposited(Event, type="account.deposited", version=3):
    amount_cents: int
    currency: str

@upcaster("account.deposited", from_version=1)
def cents(data: dict[str, Any]) -> dict[str, Any]:          # v1 -> v2
    return {"amount_cents": data["amount"] * 100}

@upcaster("account.deposited", from_version=2)
def currency(data: dict[str, Any], metadata: Metadata) -> dict[str, Any]:   # v2 -> v3
    return {**data, "currency": metadata.headers.get("currency", "EUR")}

@upcaster("account.credited", from_version=1, to_type="account.deposited", to_version=2)
def renamed(data: dict[str, Any]) -> dict[str, Any]:        # an old name, read as the new one
    return {"amount_cents": data["cents"]}
```

An upcaster takes the stored data dict (and, if it has a second parameter, the event's
metadata) and returns the data of the next version: `from_version + 1` of the same type by
default, or `to_type`/`to_version` for a rename. The codec runs the chain from the stored
(type, version) to a registered class every time an event is decoded (store reads,
subscriptions, projections, aggregates, broker consumers, dead-letter replays), so nothing
stored is ever rewritten. `TypeRegistry.check()` (run when a store or a broker opens) refuses a
chain with a gap, so a missing step is found when the application starts, not when the first
old event is read.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from tidings.core.errors import ConfigurationError
from tidings.core.events import TypeRegistry, default_registry
from tidings.core.upcast_step import Upcaster, UpcasterGap

__all__ = ["Upcaster", "UpcasterGap", "upcaster"]

F = TypeVar("F", bound=Callable[..., dict[str, Any]])


def upcaster(
    type: str,
    from_version: int,
    *,
    to_type: str | None = None,
    to_version: int | None = None,
    registry: TypeRegistry | None = None,
) -> Callable[[F], F]:
    """Register a function turning `type` v`from_version` data into the next version's.

    The next version is `from_version + 1` of the same type unless `to_type` (a rename)
    or `to_version` say otherwise. A second upcaster for one (type, version) is an error.
    """
    if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
        raise ConfigurationError(f"from_version must be an integer >= 1, not {from_version!r}")
    target_type = to_type or type
    target_version = from_version + 1 if to_version is None else to_version
    if target_type == type and target_version <= from_version:
        raise ConfigurationError(
            f"an upcaster of {type} v{from_version} must go to a later version, "
            f"not v{target_version}"
        )

    def register(function: F) -> F:
        params = [
            p
            for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if not 1 <= len(params) <= 2:
            raise ConfigurationError(
                f"upcaster {function.__qualname__} takes (data) or (data, metadata)"
            )
        step = Upcaster(type, from_version, target_type, target_version, function, len(params) == 2)
        (registry if registry is not None else default_registry).add_upcaster(step)
        return function

    return register
