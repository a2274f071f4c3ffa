"""The documentation site: every Python block in docs/*.md runs, and the site builds cleanly.

How a page's ```python blocks run:

- By default each block is a complete script: it runs alone, in a fresh process, in an empty
  temporary folder (so `sqlite:///app.db` is a new file), one test per block.
- A page that builds one example up over several blocks carries the line
  `<!-- docs-test: one script -->`; its blocks then run concatenated, in order, as one
  script, one test per page. There is no third kind: no block is skipped as a fragment.
- `print(...)  # text` states the output: `text` must appear in what the script printed.
- A script that names a server (`postgresql://`, `redis://`, `amqp://`, `nats://` with a
  host and port) needs it: when nothing answers there the test skips, saying which, or fails
  under `TIDINGS_REQUIRE_SERVICES=1` (CI). Examples keep reruns apart themselves (topics
  with a random suffix, RabbitMQ groups with `?expires=`, NATS consumers with
  `?group_expiry=`); PostgreSQL schemas named `docs_…` that a script created are dropped
  afterwards.

Shell blocks (```console, ```sh) are not run.

`test_site_builds` runs `mkdocs build --strict` into a temporary folder and fails on any
warning; it skips when mkdocs is not installed, except under `TIDINGS_REQUIRE_SERVICES=1`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ONE_SCRIPT = "<!-- docs-test: one script -->"
REQUIRE_SERVICES = os.environ.get("TIDINGS_REQUIRE_SERVICES") == "1"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_EXPECTED = re.compile(r"print\((.*?)\)\s+# (.+)")
_SERVER = re.compile(r"\b(postgresql|redis|amqp|nats)://(?:[^@\s/\"']*@)?([\w.-]+):(\d+)")
_NAMES = {"postgresql": "PostgreSQL", "redis": "Redis", "amqp": "RabbitMQ", "nats": "NATS"}


def _examples() -> list[tuple[str, str]]:
    """(test id, script) for every block, or every one-script page."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        blocks = _BLOCK.findall(text)
        name = page.relative_to(DOCS).as_posix()
        if ONE_SCRIPT in text and blocks:
            found.append((name, "\n\n".join(blocks)))
        else:
            found.extend((f"{name}#{n + 1}", block) for n, block in enumerate(blocks))
    return found


EXAMPLES = _examples()


def test_every_pattern_and_challenge_page_has_examples() -> None:
    pages = {name.split("#")[0] for name, _ in EXAMPLES}
    for page in (
        "getting-started.md",
        "event-notification.md",
        "event-carried-state-transfer.md",
        "event-sourcing.md",
        "cqrs.md",
        "eventual-consistency.md",
        "ordering.md",
        "schema-evolution.md",
        "debugging.md",
        "brokers.md",
        "operations.md",
    ):
        assert page in pages, page


@pytest.mark.parametrize("script", [s for _, s in EXAMPLES], ids=[i for i, _ in EXAMPLES])
def test_example_runs(script: str, tmp_path: Path) -> None:
    _require_servers(script)
    schemas = _docs_schemas() if "postgresql://" in script else set()
    try:
        path = tmp_path / "example.py"
        path.write_text(script)
        done = subprocess.run(
            [sys.executable, str(path)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        if "postgresql://" in script:
            _drop_schemas(_docs_schemas() - schemas)
    assert done.returncode == 0, done.stderr
    for line, expected in _EXPECTED.findall(script):
        assert expected.strip() in done.stdout, (line, expected, done.stdout)


def test_site_builds(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        message = 'mkdocs is not installed (pip install -e ".[docs]")'
        if REQUIRE_SERVICES:
            pytest.fail(message + "; TIDINGS_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(message)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert not warnings, output
    assert (tmp_path / "index.html").is_file()


def _require_servers(script: str) -> None:
    for scheme, host, port in sorted(set(_SERVER.findall(script))):
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                continue
        except OSError:
            pass
        message = f"{_NAMES[scheme]} is not running at {host}:{port}"
        if REQUIRE_SERVICES:
            pytest.fail(message + "; TIDINGS_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(message)


def _docs_schemas() -> set[str]:
    """The PostgreSQL schemas whose names start with `docs_`."""

    async def names() -> set[str]:
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(POSTGRES)
        try:
            rows = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'docs\\_%'"
            )
        finally:
            await conn.close()
        return {row["nspname"] for row in rows}

    return asyncio.run(names())


def _drop_schemas(schemas: set[str]) -> None:
    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES)
        try:
            for schema in sorted(schemas):
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    if schemas:
        asyncio.run(drop())


def test_server_urls_are_found() -> None:
    found = _SERVER.findall(
        'open_broker("amqp://guest:guest@127.0.0.1:5672/?expires=60") '
        'f"postgresql://postgres@127.0.0.1:5432/test?schema=docs_{run}" '
        "redis://127.0.0.1:6379/0 nats://127.0.0.1:4222"
    )
    assert [(s, p) for s, _, p in found] == [
        ("amqp", "5672"),
        ("postgresql", "5432"),
        ("redis", "6379"),
        ("nats", "4222"),
    ]
