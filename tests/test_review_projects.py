"""Review of projects, tokens, keys, channels and the audit trail: bad input that answered 500
or printed a traceback, a race between revocations, and a route document that left things out,
each caused for real."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from koolbase_ota import audit
from koolbase_ota.projects import service as projects
from tests.conftest import Project, RunningServer, assert_error, uploaded
from tests.test_cli import (
    DB_FILE,
    cli_env,
    cli_error_problems,
    create_project,
    query,
    run_cli,
    run_cli_all,
)

SEED = ["production", "staging", "development"]


def _channel_names(client: httpx.Client, project: Project) -> list[str]:
    response = client.get(project.path("/channels"), headers=project.auth)
    assert response.status_code == 200, response.text
    return [channel["name"] for channel in response.json()]


def _audit_actions(client: httpx.Client, project: Project) -> list[str]:
    response = client.get(f"/v1/projects/{project.id}/audit", headers=project.auth)
    assert response.status_code == 200, response.text
    return [event["action"] for event in response.json()]


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000,
        b'{"name": ' + b"[" * 5000,
        b'{"name": "beta", "x": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}",
    ],
    ids=["arrays", "inside-an-object", "objects"],
)
def test_json_nested_past_the_recursion_limit_is_400_and_changes_nothing(
    client: httpx.Client, project: Project, body: bytes
) -> None:
    """JSON nested a few thousand deep (well inside the 64 KiB body limit) raised
    RecursionError in the body parser every dashboard JSON route shares: a 500."""
    headers = {**project.auth, "Content-Type": "application/json"}
    bundle = uploaded(client, project)

    assert_error(client.post(project.path("/channels"), headers=headers, content=body), 400)
    activate = project.path(f"/bundles/{bundle['id']}/activate")
    assert_error(client.post(activate, headers=headers, content=body), 400)
    patch = project.path(f"/bundles/{bundle['id']}")
    assert_error(client.patch(patch, headers=headers, content=body), 400)

    assert _channel_names(client, project) == SEED
    assert _audit_actions(client, project) == ["bundle.upload", "project.create"]
    listed = client.get(project.path("/bundles"), headers=project.auth).json()
    assert [(item["active"], item["mandatory"]) for item in listed] == [(False, False)]


@pytest.mark.parametrize(
    "name",
    # "\udcff" is what Python makes of an argument byte that is not UTF-8 (a Latin-1 shell).
    ["caf\udcff", "two\nlines", "tab\there", "bell\x07"],
    ids=["not-utf8", "newline", "tab", "control"],
)
def test_a_project_name_with_control_or_undecodable_characters_is_one_error_line(
    tmp_path: Path, name: str
) -> None:
    """A name that was not UTF-8 failed inside the database driver with a traceback; control
    characters were stored and broke the one-line `project list`."""
    result = run_cli(tmp_path, "project", "create", name)

    assert not cli_error_problems(result, "project name")
    assert query(tmp_path, "SELECT count(*) FROM projects") == [(0,)]


def test_a_database_that_fails_mid_command_is_one_error_line(tmp_path: Path) -> None:
    """A write that met a locked (or lost) database printed SQLAlchemy's traceback, with the
    statement, instead of one `error:` line."""
    project_id = create_project(tmp_path)["project_id"]
    env = cli_env(tmp_path, KOOLBASE_OTA_DATABASE_TIMEOUT_SECONDS="1")
    commands = [
        ("token", "create", "--project", project_id),
        ("key", "rotate", "--project", project_id, "--environment", "staging"),
        ("channel", "add", "--project", project_id, "beta"),
    ]
    # Another writer holds the database (a server committing, a long `move`) throughout.
    with contextlib.closing(
        sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    ) as connection:
        connection.execute("BEGIN IMMEDIATE")
        results = run_cli_all(tmp_path, commands, env=env)
        connection.execute("ROLLBACK")

    problems = [problem for result in results for problem in cli_error_problems(result, "locked")]
    assert not problems, "\n".join(problems)
    for result in results:
        assert "INSERT" not in result.stderr
        assert "UPDATE" not in result.stderr
    assert query(tmp_path, "SELECT count(*) FROM dashboard_tokens") == [(1,)]
    assert query(tmp_path, "SELECT count(*) FROM channels WHERE name = 'beta'") == [(0,)]


@pytest.mark.parametrize(
    ("args", "mention"),
    [
        (("gc", "--grace-seconds", "99999999999999"), "--grace-seconds"),
        (("gc", "--grace-seconds", "-1"), "--grace-seconds"),
        (("serve", "--port", "99999"), "--port"),
        (("serve", "--workers", "0"), "--workers"),
    ],
)
def test_numbers_out_of_range_are_one_error_line(
    tmp_path: Path, args: tuple[str, ...], mention: str
) -> None:
    """A grace period past what a date holds, or a port past 65535, failed with a traceback
    after the command had started (`serve` had already made the default project); a negative
    grace period removed files as young as those of uploads still in flight."""
    data_dir = tmp_path / "data"

    result = run_cli(data_dir, *args)

    assert not cli_error_problems(result, mention)
    assert not (data_dir / "credentials.json").exists()


def test_two_revocations_of_one_token_at_once_record_one(
    server: RunningServer, project: Project
) -> None:
    """On PostgreSQL both revocations read the token as live, so both wrote a `token.revoke`
    event and the second moved `revoked_at` ("revoking twice keeps the first time")."""
    if server.backend != "postgres-s3":
        pytest.skip("SQLite runs write transactions one at a time")
    engine = server.db.engine
    row, _token = projects.create_token(server.db, project_id=project.id)
    find = text("SELECT 1 FROM dashboard_tokens WHERE id = :id FOR UPDATE")
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    with ThreadPoolExecutor(max_workers=2) as pool:
        # A third transaction holds the row until both revocations wait on it, so they race.
        with engine.connect() as holder, engine.connect() as watcher:
            holder.execute(find, {"id": row.id})
            revoking = [
                pool.submit(projects.revoke_token, server.db, token_id=row.id) for _ in range(2)
            ]
            deadline = time.monotonic() + 30
            while watcher.execute(waiting).scalar_one() < 2:
                watcher.rollback()  # pg_stat_activity is read once a transaction
                assert time.monotonic() < deadline, "the revocations never met the lock"
                assert not any(future.done() for future in revoking)
                time.sleep(0.01)
            holder.commit()
        revoked = [future.result() for future in revoking]

    assert revoked[0].revoked_at is not None
    assert revoked[0].revoked_at == revoked[1].revoked_at
    (stored,) = [
        t for t in projects.list_tokens(server.db, project_id=project.id) if t.id == row.id
    ]
    assert stored.revoked_at == revoked[0].revoked_at
    with server.db.read() as session:
        count = session.execute(
            text("SELECT count(*) FROM audit_events WHERE action = 'token.revoke' AND target = :t"),
            {"t": str(row.id)},
        ).scalar_one()
    assert count == 1


def test_the_documented_audit_route_names_every_action_it_records(client: httpx.Client) -> None:
    """The route's description listed uploads, activations, mandatory flags, deletions, token
    and key changes as "every change", leaving out channels, recalls, promotions, targeting
    and rollout updates and project creation."""
    recorded = {
        value
        for name, value in vars(audit).items()
        if name.isupper() and isinstance(value, str) and "." in value
    }
    spec = client.get("/openapi.json").json()
    description = spec["paths"]["/v1/projects/{project_id}/audit"]["get"]["description"]

    assert len(recorded) == 12
    assert {action for action in recorded if f"`{action}`" not in description} == set()
