"""KOOLBASE_OTA_DATABASE_CONNECTIONS bounds the database connections a process opens, so that
several processes fit one PostgreSQL's `max_connections`."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Connection, make_url, text

from koolbase_ota.cli import ensure_default_project
from koolbase_ota.config import Settings
from koolbase_ota.db import Database, create_db_engine, upgrade_schema
from koolbase_ota.projects import service as projects
from koolbase_ota.sdk.cache import CHECK_CONNECTIONS
from tests.conftest import Project, RunningServer, assert_error, new_project, released
from tests.services import PostgresService
from tests.test_check_isolation import shared_threads_in_use
from tests.test_cli import cli_env, run_cli

#: More dashboard requests at once than the bound lets through to the database.
REQUESTS = 12
BOUND = 3
#: The least the setting accepts.
MINIMUM = 2


def server_sessions(server: RunningServer, locker: Connection) -> tuple[int, int]:
    """(all, waiting on a lock) of the server's sessions in its database, read on `locker`."""
    query = text(
        "SELECT count(*), count(*) FILTER (WHERE wait_event_type = 'Lock')"
        " FROM pg_stat_activity WHERE datname = :database AND pid <> pg_backend_pid()"
    )
    database = make_url(server.settings.database_url).database
    total, waiting = locker.execute(query, {"database": database}).one()
    return int(total), int(waiting)


def test_dashboard_requests_share_at_most_the_set_connections(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(database_connections=BOUND, database_timeout_seconds=60)
    if server.backend != "postgres-s3":
        pytest.skip("PostgreSQL's sessions are what is counted")
    project: Project = new_project(server.db)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        bundle = released(client, project)

    def set_mandatory(client: httpx.Client) -> int:
        response = client.patch(
            project.path(f"/bundles/{bundle['id']}"),
            headers=project.auth,
            json={"mandatory": True},
        )
        return response.status_code

    with (
        httpx.Client(
            base_url=server.base_url,
            timeout=120,
            limits=httpx.Limits(max_connections=REQUESTS),
        ) as client,
        ThreadPoolExecutor(max_workers=REQUESTS) as pool,
        server.db.engine.connect() as locker,
    ):
        # Another program holds the bundles: every write to them waits, on its connection.
        locker.execute(text("LOCK TABLE bundles IN EXCLUSIVE MODE"))
        stuck = [pool.submit(set_mandatory, client) for _ in range(REQUESTS)]
        deadline = time.monotonic() + 30
        # Every request in the server's hands: on a connection, or waiting for one.
        while shared_threads_in_use(server)[0] < REQUESTS:
            assert time.monotonic() < deadline, "the requests never reached the server"
            time.sleep(0.05)
        while server_sessions(server, locker)[1] < BOUND:
            assert time.monotonic() < deadline, "the requests never reached the database"
            time.sleep(0.05)
        total, waiting = server_sessions(server, locker)
        assert waiting == BOUND
        assert total <= BOUND + CHECK_CONNECTIONS
        assert not any(future.done() for future in stuck)
        locker.rollback()
        # The lock is gone: the waiting requests take the connections in turn, none is lost.
        assert [future.result(timeout=60) for future in stuck] == [200] * REQUESTS


def test_a_request_that_finds_every_connection_busy_is_503_and_checks_go_on(
    server_factory: Callable[..., RunningServer],
) -> None:
    """It waits for a connection up to the database timeout, then fails cleanly; the checks,
    on connections of their own, are answered meanwhile."""
    server = server_factory(database_connections=MINIMUM, database_timeout_seconds=1)
    project: Project = new_project(server.db)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        bundle = released(client, project)
        # The process's dashboard connections, held (as by requests stuck on a lock).
        engine = server.context.db.engine
        with engine.connect(), engine.connect():
            listed = client.get(project.path("/bundles"), headers=project.auth)
            assert_error(listed, 503, "database_unavailable")
            answer = client.get(
                "/v1/sdk/ota/check?current_bundle=0&channel=production", headers=project.key()
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["version"] == bundle["version"]
        # Given back: the next request has it.
        assert client.get(project.path("/bundles"), headers=project.auth).status_code == 200


def test_a_command_migrates_a_new_postgresql_database_at_the_minimum(
    postgres: PostgresService, tmp_path: Path
) -> None:
    """Migrating holds the advisory lock on one connection and migrates on another (found by
    review: at a bound of 1 every command on a new database waited out the timeout)."""
    env = cli_env(
        tmp_path,
        KOOLBASE_OTA_DATABASE_URL=postgres.create_database(),
        KOOLBASE_OTA_DATABASE_CONNECTIONS=str(MINIMUM),
        KOOLBASE_OTA_DATABASE_TIMEOUT_SECONDS="2",
    )
    result = run_cli(tmp_path, "project", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert result.json() == []


def test_a_start_on_postgresql_at_the_minimum(postgres: PostgresService, tmp_path: Path) -> None:
    """Every `serve` start looks for a project under the migration lock: two connections."""
    url = postgres.create_database()
    engine = create_db_engine(url, timeout_seconds=2, connections=MINIMUM)
    try:
        upgrade_schema(engine, lock_dir=tmp_path)
        settings = Settings(data_dir=tmp_path, database_url=url).resolved()
        created = ensure_default_project(settings, Database(engine))
        assert created is not None  # a new database: the first start makes the default project
        assert ensure_default_project(settings, Database(engine)) is None  # and only once
        assert [row.name for row in projects.list_projects(Database(engine))] == ["default"]
    finally:
        engine.dispose()
