"""`tidings console` on the command line: its help, and a bad store as one error line."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tidings.cli.main import app


def test_help_answers_the_questions() -> None:
    result = CliRunner().invoke(app, ["console", "--help"], terminal_width=100)
    assert result.exit_code == 0
    for words in ("--store", "--broker", "--app", "127.0.0.1", "8765", "token"):
        assert words in result.output


def test_a_missing_store_is_an_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    result = CliRunner().invoke(app, ["console", "--store", f"sqlite:///{missing}"])
    assert result.exit_code == 2
    assert "no event store" in result.output
    assert not missing.exists()
