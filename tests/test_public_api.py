"""The public names are pinned: removing one is a breaking change."""

from __future__ import annotations

import subprocess
import sys

import tidings


def test_all_is_sorted_and_complete() -> None:
    assert list(tidings.__all__) == sorted(tidings.__all__)
    for name in tidings.__all__:
        assert hasattr(tidings, name), name
    modules = {
        "core",
        "store",
        "cli",
        "demo",
        "app",
        "testing",
        "brokers",
        "schema",
        "asyncapi",
        "console",
        "telemetry",
        "integrations",
    }
    public = {n for n in dir(tidings) if not n.startswith("_")} - modules
    assert public == set(tidings.__all__)


def test_errors_share_one_root() -> None:
    for name in tidings.__all__:
        value = getattr(tidings, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, tidings.TidingsError), name


def test_importing_tidings_loads_no_driver() -> None:
    drivers = ("sqlite3", "asyncpg", "redis", "aio_pika", "nats", "aiokafka", "aiobotocore")
    code = f"import sys, tidings; print(','.join(m for m in {drivers!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
