"""Connection URLs: shown without their passwords, and the backend class a URL's scheme names."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tidings.core.errors import ConfigurationError

__all__ = ["Backends", "backend_class", "redact_url"]

Backends = dict[str, tuple[str, str, str | None, str | None]]
"""scheme -> (module, class, client module or None, extra that installs the client)"""


def redact_url(url: str) -> str:
    """`url` without its password (`amqp://guest:***@host/`), for logs, pages and output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def backend_class(
    backends: Backends,
    scheme: str,
    *,
    unknown: str,
    needs: str,
) -> Any:
    """The class `backends[scheme]` names, its module imported only now. An unknown scheme
    raises `unknown` followed by the known schemes; a missing client library names the
    extra that installs it (`needs`: "client", "driver")."""
    if scheme not in backends:
        known = ", ".join(f"{name}://" for name in backends)
        raise ConfigurationError(unknown + known)
    module_name, class_name, client, extra = backends[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if client is not None and importlib.util.find_spec(client) is None:
            raise ConfigurationError(
                f'{scheme}:// needs the {client} {needs}: pip install "tidings[{extra}]"'
            ) from exc
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name:
            raise ConfigurationError(f"{scheme}:// is not built yet") from None
        raise
    return getattr(module, class_name)
