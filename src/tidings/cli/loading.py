"""Importing the user's code named on the command line (`--app module[:attr]`, `run`)."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

from tidings.core.errors import ConfigurationError

__all__ = ["import_module", "import_target"]


def import_module(module_name: str) -> ModuleType:
    """Import a module from the current folder (as `python -m` would) or `$PYTHONPATH`."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)  # the user's own package comes first
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise ConfigurationError(
                f"cannot import {module_name}: no module named {exc.name!r} in the current "
                "folder or on $PYTHONPATH"
            ) from None
        raise


def import_target(target: str) -> Any:
    """The object `module:attribute` names; a clear error naming what is missing."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"{target!r}: write module:attribute, e.g. myapp.email:service")
    module = import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"module {module_name} has no attribute {attribute!r}") from None
