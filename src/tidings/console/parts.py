"""What `--app MODULE` gives the console: projections to rebuild, aggregates for time travel,
services whose consumer groups it can name, and the event classes that decode their events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tidings.app.aggregate import Aggregate
from tidings.app.projections import Projection
from tidings.app.service import Service
from tidings.cli.loading import import_module
from tidings.cli.projections import load_projections
from tidings.core.events import Event, TypeRegistry

__all__ = ["AppParts", "load_app"]


@dataclass
class AppParts:
    """The parts of an application the console can use; all optional."""

    module: str = ""
    projections: dict[str, Projection] = field(default_factory=dict)
    aggregates: dict[str, type[Aggregate]] = field(default_factory=dict)  # by category
    services: list[Service] = field(default_factory=list)

    def aggregate_for(self, stream_id: str) -> type[Aggregate] | None:
        """The aggregate class whose category prefixes `stream_id` (`<category>-<id>`)."""
        category, dash, _ = stream_id.partition("-")
        return self.aggregates.get(category) if dash else None

    def registry(self) -> TypeRegistry:
        """A registry that decodes what these projections and aggregates read."""
        classes: set[type[Event]] = set()
        for projection in self.projections.values():
            classes |= projection.__handlers__.event_classes()
        for aggregate in self.aggregates.values():
            classes |= aggregate.__handlers__.event_classes()
        return TypeRegistry.of(classes)


def load_app(target: str) -> AppParts:
    """Import `target` (a module, as `tidings worker --app` takes) and collect its parts:
    projections as `load_projections` finds them, and the `Aggregate` subclasses and
    `Service` instances defined in the module."""
    module_name = target.partition(":")[0]
    projections = load_projections(target)
    module = import_module(module_name)
    aggregates: dict[str, type[Aggregate]] = {}
    services: list[Service] = []
    for value in vars(module).values():
        if _is_aggregate(value) and value.__module__ == module.__name__:
            aggregates[value.__category__] = value
        elif isinstance(value, Service):
            services.append(value)
    return AppParts(target, projections, aggregates, services)


def _is_aggregate(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, Aggregate) and value is not Aggregate
