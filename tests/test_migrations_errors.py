"""`db upgrade` (and every command, which migrates first) on a database it cannot use: one
`error:` line naming the problem, never a traceback, never the password of the URL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.services import free_ports
from tests.test_cli import DB_FILE, cli_env, ok, run_cli


def test_a_database_a_newer_version_migrated_is_refused_in_one_line(tmp_path: Path) -> None:
    """An older process started after an upgrade (a rolled-back deploy) says why it stops."""
    ok(tmp_path, "db", "upgrade")
    with sqlite3.connect(tmp_path / DB_FILE) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099'")
    for args in (("db", "upgrade"), ("project", "list")):
        result = run_cli(tmp_path, *args)
        assert result.returncode == 1
        assert result.stderr.startswith(
            "error: the database schema is at revision 0099, which this version of"
            " koolbase-ota does not know"
        )
        assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "command",
    [
        ("db", "upgrade"),
        # It migrates before it listens: it exits, for a service manager to start it again
        # (docs/DEPLOYMENT.md), and never binds the port.
        ("serve", "--host", "127.0.0.1", "--port", "1"),
    ],
    ids=" ".join,
)
def test_an_unreachable_database_is_one_error_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    (port,) = free_ports(1)  # nothing listens there
    url = f"postgresql://ota:hunter2secret@127.0.0.1:{port}/ota"
    result = run_cli(tmp_path, *command, env=cli_env(tmp_path, KOOLBASE_OTA_DATABASE_URL=url))
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot use the database: connection failed")
    assert result.stderr.count("\n") == 1
    assert "hunter2secret" not in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://ota:hunter2secret@db.example.com:port/ota",
        "mysql://ota:hunter2secret@db.example.com/ota",
        "hunter2secret",
    ],
)
def test_a_database_url_that_cannot_be_used_is_one_error_line(tmp_path: Path, url: str) -> None:
    result = run_cli(
        tmp_path, "db", "upgrade", env=cli_env(tmp_path, KOOLBASE_OTA_DATABASE_URL=url)
    )
    assert result.returncode == 1
    assert result.stderr == (
        "error: the database URL is not one koolbase-ota can use: expected"
        " postgresql://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:///PATH\n"
    )


def test_move_to_an_unreachable_database_is_one_error_line(tmp_path: Path) -> None:
    ok(tmp_path, "project", "create", "moving")
    (port,) = free_ports(1)
    result = run_cli(
        tmp_path,
        "move",
        "--database-url",
        f"postgresql://ota:hunter2secret@127.0.0.1:{port}/ota",
        "--storage-url",
        "s3://bucket",
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot use the database: connection failed")
    assert result.stderr.count("\n") == 1
