"""`db upgrade` (and every command, which migrates first) on a database it cannot use: one
`error:` line naming the problem, never a traceback, never the password of the URL."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import eventually
from tests.services import PostgresService, free_ports
from tests.test_cli import DB_FILE, CliResult, cli_env, ok, run_cli, terminated_once
from tests.test_e2e import launch, stop, wait_until_answering


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
        # It migrates before its workers start: without a wait it exits, for a service
        # manager to start it again (docs/DEPLOYMENT.md).
        ("serve", "--host", "127.0.0.1", "--port", "PORT"),
    ],
    ids=" ".join,
)
def test_an_unreachable_database_is_one_error_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    port, served = free_ports(2)  # nothing listens at the first
    url = f"postgresql://ota:hunter2secret@127.0.0.1:{port}/ota"
    env = cli_env(
        tmp_path, KOOLBASE_OTA_DATABASE_URL=url, KOOLBASE_OTA_DATABASE_START_WAIT_SECONDS="0"
    )
    result = run_cli(tmp_path, *(str(served) if c == "PORT" else c for c in command), env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot use the database: connection failed")
    assert result.stderr.count("\n") == 1
    assert "hunter2secret" not in result.stderr


def test_serve_tries_a_database_it_cannot_reach_for_a_while_then_exits(tmp_path: Path) -> None:
    """`db upgrade` (like every command but `serve`) fails at once, for a script to see."""
    port, served_port = free_ports(2)
    env = cli_env(
        tmp_path,
        KOOLBASE_OTA_DATABASE_URL=f"postgresql://ota:hunter2secret@127.0.0.1:{port}/ota",
        KOOLBASE_OTA_DATABASE_START_WAIT_SECONDS="2",
    )
    upgrade = run_cli(tmp_path, "db", "upgrade", env=env)
    began = time.monotonic()
    served = run_cli(tmp_path, "serve", "--host", "127.0.0.1", "--port", str(served_port), env=env)
    assert upgrade.returncode == served.returncode == 1
    assert upgrade.stderr.count("\n") == 1
    assert "trying again" not in upgrade.stderr
    assert time.monotonic() - began >= 2
    # The reason once, when it is new (not at every try), then the one error line.
    warning, error, end = served.stderr.split("\n")
    assert "WARNING" in warning
    assert re.search(
        r"Connection refused; trying again for up to [12]\.\d s"
        r" \(KOOLBASE_OTA_DATABASE_START_WAIT_SECONDS\)$",
        warning,
    ), warning
    assert error.startswith("error: cannot use the database: connection failed")
    assert re.search(r"Connection refused \(tried for \d+\.\d s\)$", error), error
    assert end == ""
    assert "hunter2secret" not in served.stderr


def test_serve_waits_for_a_socket_not_there_yet(tmp_path: Path) -> None:
    """A local PostgreSQL on its Unix socket, not started yet: libpq fails at once there, which
    psycopg words as for a URL option it refuses ("connection is bad"), and it was not waited
    for (found by review, helper-44)."""
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    env = cli_env(
        tmp_path,
        KOOLBASE_OTA_DATABASE_URL=f"postgresql://postgres@/postgres?host={sockets}",
        KOOLBASE_OTA_DATABASE_START_WAIT_SECONDS="1",
    )
    served = run_cli(
        tmp_path, "serve", "--host", "127.0.0.1", "--port", str(free_ports(1)[0]), env=env
    )
    assert served.returncode == 1
    assert "No such file or directory; trying again for up to" in served.stderr
    assert re.search(r"No such file or directory \(tried for \d+\.\d s\)\n$", served.stderr)


def test_serve_ends_its_wait_on_sigterm(tmp_path: Path) -> None:
    """Also where SIGTERM is ignored by default: as PID 1 of a container without an init, the
    wait outlasted `docker stop`'s grace period (a handler is what makes it end there)."""
    port, served_port = free_ports(2)
    env = cli_env(
        tmp_path,
        KOOLBASE_OTA_DATABASE_URL=f"postgresql://ota:pw@127.0.0.1:{port}/ota",
        KOOLBASE_OTA_DATABASE_START_WAIT_SECONDS="60",
    )

    def waiting(server: subprocess.Popen[bytes]) -> None:
        assert server.stderr is not None
        assert "trying again" in server.stderr.readline().decode()

    returncode, rest = terminated_once(
        env, ["serve", "--host", "127.0.0.1", "--port", str(served_port)], waiting
    )
    assert returncode == 128 + signal.SIGTERM
    assert rest == b""  # no traceback, no error line: it was asked to stop


@pytest.mark.parametrize(
    ("url", "error"),
    [
        # Not tried again for a minute: nothing will change by then.
        (
            "postgresql://ota:pw@127.0.0.1:1/ota?sslmode=bogus",
            'error: cannot use the database: connection is bad: invalid sslmode value: "bogus"',
        ),
        (
            "postgresql://ota:pw@127.0.0.1:99999/ota",
            "error: the database URL is not one koolbase-ota can use: expected"
            " postgresql://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:///PATH",
        ),
        # The part of the password after its @ was taken for the host, and named in the
        # driver's error ("failed to resolve host '2secret@127.0.0.1'").
        (
            "postgresql://ota:hunter@2secret@127.0.0.1:1/ota",
            "error: the database URL has an @ besides the one before its host (in the user"
            " name, the password or the query): write it as %40",
        ),
        # Without a password, an @ in the query made the user name run into the host.
        (
            "postgresql://ota@[::1]:1/ota?application_name=a@b",
            "error: the database URL has an @ besides the one before its host (in the user"
            " name, the password or the query): write it as %40",
        ),
    ],
    ids=["sslmode", "port", "at-sign", "at-sign-in-query"],
)
def test_serve_does_not_wait_for_a_url_that_cannot_work(
    tmp_path: Path, url: str, error: str
) -> None:
    result, seconds = _serve_with_the_default_wait(tmp_path, url)
    assert result.returncode == 1
    assert result.stderr == error + "\n"
    assert seconds < 30  # the default wait is 60 s


def _serve_with_the_default_wait(tmp_path: Path, url: str) -> tuple[CliResult, float]:
    """`serve` on the database at `url`, and how long it took to exit."""
    began = time.monotonic()
    env = cli_env(tmp_path, KOOLBASE_OTA_DATABASE_URL=url)
    result = run_cli(
        tmp_path, "serve", "--host", "127.0.0.1", "--port", str(free_ports(1)[0]), env=env
    )
    return result, time.monotonic() - began


def test_serve_is_not_kept_waiting_by_a_schema_a_newer_version_migrated(
    postgres: PostgresService, tmp_path: Path
) -> None:
    """Trying again cannot help there: it exits at once, with the default wait."""
    url = postgres.create_database()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        connection.execute("INSERT INTO alembic_version VALUES ('0099')")
    result, seconds = _serve_with_the_default_wait(tmp_path, url)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the database schema is at revision 0099")
    assert result.stderr.count("\n") == 1
    assert seconds < 30


def test_serve_started_before_its_database_serves_once_it_is_up(tmp_path: Path) -> None:
    """A server and its database started together (a compose file, a host booting): the
    server exited at once, and a service manager giving up after a few quick failures left it
    down; it now tries the database again and serves once it can."""
    with PostgresService() as late:
        url = late.create_database()
        late.stop()
        server = launch(tmp_path / "data", "late", env={"KOOLBASE_OTA_DATABASE_URL": url})
        try:
            eventually(lambda: "trying again" in server.log(), "the first failure", within=30)
            time.sleep(2)  # a few more tries
            assert server.process.poll() is None, server.log()
            late.start()
            wait_until_answering(server)
            assert httpx.get(server.base_url + "/readyz", timeout=10).status_code == 200
            log = server.log()
            # Refused until it listens, or, at that moment, "the database system is starting
            # up": each reason once.
            waits = [line for line in log.splitlines() if "trying again" in line]
            assert 1 <= len(waits) <= 2, log
            assert all("Connection refused" in w or "starting up" in w for w in waits), log
            assert "the database can be used now" in log
            assert "migrated the database to revision" in log
        finally:
            stop(server.process)


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
