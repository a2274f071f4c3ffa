"""`url_options`: the query parameters of a store or broker URL, typed and checked.

Shared by every backend that is opened from a URL, so an unknown or malformed option fails
the same way (a `ConfigurationError` naming it) wherever it is given.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tidings.core.errors import ConfigurationError

__all__ = ["url_options"]


def url_options(url: str, known: dict[str, type]) -> dict[str, Any]:
    """The query parameters of `url`, converted to the types in `known`.

    An unknown parameter or a bad value is a `ConfigurationError` naming it.
    """
    options: dict[str, Any] = {}
    for key, raw in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key not in known:
            raise ConfigurationError(
                f"unknown option {key!r} in {url!r}; known: {', '.join(sorted(known)) or 'none'}"
            )
        kind = known[key]
        try:
            if kind is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                options[key] = raw.lower() in ("1", "true", "yes")
            else:
                options[key] = kind(raw)
        except ValueError:
            raise ConfigurationError(
                f"option {key}={raw!r} in {url!r} is not a valid {kind.__name__}"
            ) from None
    return options
