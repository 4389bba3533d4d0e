"""Dashboard tokens, project isolation, and the one shape every error answer has."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

from koolbase_ota.db import utcnow
from koolbase_ota.projects import service as projects
from koolbase_ota.projects.models import DashboardToken
from tests.conftest import (
    Project,
    RunningServer,
    assert_error,
    make_zip,
    new_project,
    released,
    uploaded,
)

# Every dashboard route, as (method, path below /ota, body): `{bundle}` is a bundle id.
Route = tuple[str, str]
ROUTES: list[Route] = [
    ("POST", "/upload"),
    ("GET", "/bundles"),
    ("POST", "/bundles/{bundle}/activate"),
    ("PATCH", "/bundles/{bundle}"),
    ("DELETE", "/bundles/{bundle}"),
]
ROUTE_IDS = ["upload", "list", "activate", "patch", "delete"]


def call(
    client: httpx.Client,
    route: Route,
    *,
    project_id: uuid.UUID | str,
    bundle_id: str,
    headers: dict[str, str],
) -> httpx.Response:
    method, rest = route
    path = f"/v1/projects/{project_id}/ota" + rest.format(bundle=bundle_id)
    if rest == "/upload":
        return client.post(
            path,
            headers=headers,
            files={"bundle": ("bundle.zip", make_zip({"evil.json": "{}"}), "application/zip")},
            data={"channel": "production", "mandatory": "true"},
        )
    if method == "PATCH":
        return client.patch(path, headers=headers, json={"mandatory": True})
    return client.request(method, path, headers=headers)


def bundles_of(client: httpx.Client, project: Project) -> list[dict[str, Any]]:
    response = client.get(project.path("/bundles"), headers=project.auth)
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


def stored_files(server: RunningServer, project: Project) -> set[str]:
    return {key for key in server.stored_keys() if key.startswith(f"ota/{project.id}/")}


@pytest.fixture
def victim(server: RunningServer, client: httpx.Client) -> tuple[Project, dict[str, Any]]:
    """Another project with one uploaded, inactive, non-mandatory bundle."""
    other = new_project(server.db, name="victim")
    return other, uploaded(client, other)


# Missing and bad tokens


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_no_token_is_401(client: httpx.Client, project: Project, route: Route) -> None:
    bundle = uploaded(client, project)
    response = call(client, route, project_id=project.id, bundle_id=bundle["id"], headers={})
    assert_error(response, 401)
    assert bundles_of(client, project) == [bundle]


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic {token}",
        "Token {token}",
        "{token}",
        "Bearer",
        "Bearer kbota_notarealtokenatallnotarealtokenatall0000000",
        "Bearer {token}x",
        "Bearer pk_live_000000000000000000000000",
    ],
)
def test_a_bad_token_is_401(client: httpx.Client, project: Project, authorization: str) -> None:
    headers = {"Authorization": authorization.format(token=project.token)}
    assert_error(client.get(project.path("/bundles"), headers=headers), 401)


def test_a_public_key_is_not_a_dashboard_token(client: httpx.Client, project: Project) -> None:
    headers = {"Authorization": f"Bearer {project.keys['production']}"}
    assert_error(client.get(project.path("/bundles"), headers=headers), 401)


def test_a_revoked_token_is_401_at_once(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    _, other_token = projects.create_token(server.db, project_id=project.id)
    assert client.get(project.path("/bundles"), headers=project.auth).status_code == 200

    projects.revoke_token(server.db, token_id=project.token_id)

    assert_error(client.get(project.path("/bundles"), headers=project.auth), 401, "token_revoked")
    # The project's other tokens keep working.
    other = {"Authorization": f"Bearer {other_token}"}
    assert client.get(project.path("/bundles"), headers=other).status_code == 200


def test_an_expired_token_is_401(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    row, token = projects.create_token(server.db, project_id=project.id, expires_in_days=1)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get(project.path("/bundles"), headers=headers).status_code == 200

    with server.db.write() as session:
        session.execute(
            update(DashboardToken)
            .where(DashboardToken.id == row.id)
            .values(expires_at=utcnow() - dt.timedelta(seconds=1))
        )

    assert_error(client.get(project.path("/bundles"), headers=headers), 401, "token_expired")
    assert client.get(project.path("/bundles"), headers=project.auth).status_code == 200


# Another project's paths


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_a_token_on_another_projects_path_is_404_and_changes_nothing(
    server: RunningServer,
    client: httpx.Client,
    project: Project,
    victim: tuple[Project, dict[str, Any]],
    route: Route,
) -> None:
    other, bundle = victim
    files_before = stored_files(server, other)
    assert files_before == {bundle["storage_path"]}

    response = call(
        client, route, project_id=other.id, bundle_id=bundle["id"], headers=project.auth
    )

    assert_error(response, 404, "project_not_found")
    assert bundle["id"] not in response.text
    assert bundles_of(client, other) == [bundle]
    assert stored_files(server, other) == files_before
    assert bundles_of(client, project) == []
    # The version counter was not touched either: the next upload is still version 2.
    assert uploaded(client, other)["version"] == 2


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_an_unknown_project_is_404(client: httpx.Client, project: Project, route: Route) -> None:
    bundle = uploaded(client, project)
    response = call(
        client, route, project_id=uuid.uuid4(), bundle_id=bundle["id"], headers=project.auth
    )
    assert_error(response, 404, "project_not_found")
    assert bundles_of(client, project) == [bundle]


@pytest.mark.parametrize("project_id", ["not-a-uuid", "1", "default", "..%2F"])
def test_a_project_id_that_is_not_a_uuid_is_404(
    client: httpx.Client, project: Project, project_id: str
) -> None:
    response = client.get(f"/v1/projects/{project_id}/ota/bundles", headers=project.auth)
    assert_error(response, 404)


def test_the_404_for_another_project_is_the_404_for_no_project(
    client: httpx.Client, project: Project, victim: tuple[Project, dict[str, Any]]
) -> None:
    other, _ = victim
    existing = client.get(other.path("/bundles"), headers=project.auth)
    missing = client.get(f"/v1/projects/{uuid.uuid4()}/ota/bundles", headers=project.auth)
    assert existing.status_code == missing.status_code == 404
    assert existing.json() == missing.json()


# Tokens at rest


def test_tokens_are_prefixed_and_only_their_sha256_is_stored(
    server: RunningServer, project: Project
) -> None:
    _, second = projects.create_token(server.db, project_id=project.id, expires_in_days=30)
    for token in (project.token, second):
        assert token.startswith("kbota_")
        # At least 32 random bytes: 43 characters of URL-safe base64.
        assert len(token) - len("kbota_") >= 43

    with server.db.read() as session:
        rows = session.execute(
            text("SELECT * FROM dashboard_tokens WHERE project_id = :id"),
            {"id": project.id.hex},
        ).all()
        hashes = set(
            session.scalars(
                select(DashboardToken.token_hash).where(DashboardToken.project_id == project.id)
            )
        )
    assert len(rows) == 2
    stored = " ".join(str(value) for row in rows for value in row)
    for token in (project.token, second):
        assert token not in stored
        assert token.removeprefix("kbota_") not in stored
    assert hashes == {
        hashlib.sha256(token.encode()).hexdigest() for token in (project.token, second)
    }

    if server.db.engine.dialect.name != "sqlite":
        return  # PostgreSQL's files hold only the rows checked above, among other tests' data.
    # Nor anywhere in the database files, the write-ahead log included.
    database = Path(make_url(server.settings.database_url).database or "")
    assert database.is_file()
    for path in (database, database.with_name(database.name + "-wal")):
        if path.exists():
            # Read by another process: closing a descriptor of the file in this one (where the
            # server runs) would drop the server's POSIX locks on the database.
            raw = subprocess.run(["cat", str(path)], capture_output=True, check=True).stdout
            assert project.token.encode() not in raw
            assert second.encode() not in raw


# The shape of every error


def test_an_unknown_route_is_a_json_404(client: httpx.Client) -> None:
    assert_error(client.get("/no/such/route"), 404)
    assert_error(client.get("/v1/projects"), 404)


@pytest.mark.parametrize(
    ("method", "rest"),
    [("PUT", "/bundles"), ("GET", "/upload"), ("GET", "/bundles/{bundle}/activate")],
)
def test_a_wrong_method_is_a_json_405(
    client: httpx.Client, project: Project, method: str, rest: str
) -> None:
    bundle = uploaded(client, project)
    path = project.path(rest.format(bundle=bundle["id"]))
    assert_error(client.request(method, path, headers=project.auth), 405)
    assert_error(client.post("/v1/sdk/ota/check", headers=project.key()), 405)


def test_a_validation_failure_is_a_json_400(client: httpx.Client, project: Project) -> None:
    response = client.get("/v1/sdk/ota/check", params={"channel": "x" * 500}, headers=project.key())
    assert_error(response, 400)


def test_a_bad_patch_body_is_a_json_400(client: httpx.Client, project: Project) -> None:
    bundle = released(client, project)
    response = client.patch(
        project.path(f"/bundles/{bundle['id']}"),
        headers={**project.auth, "Content-Type": "application/json"},
        content=b'{"mandatory": "maybe"}',
    )
    assert_error(response, 400)


@pytest.mark.parametrize(
    "request_error",
    [
        lambda client, project: client.get("/v1/sdk/ota/check"),
        lambda client, project: client.get(project.path("/bundles")),
        lambda client, project: client.post(
            project.path("/upload"), headers=project.auth, content=b"not multipart"
        ),
    ],
    ids=["check-401", "dashboard-401", "upload-not-multipart"],
)
def test_errors_are_sent_as_json(
    client: httpx.Client,
    project: Project,
    request_error: Callable[[httpx.Client, Project], httpx.Response],
) -> None:
    response = request_error(client, project)
    assert 400 <= response.status_code < 500
    assert_error(response, response.status_code)
