"""The audit trail: every change recorded with who made it, readable at /v1/projects/{id}/audit."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import httpx
import pytest

from koolbase_ota.projects import service as projects
from tests.conftest import (
    Project,
    RunningServer,
    assert_error,
    make_zip,
    new_project,
    released,
    upload,
    uploaded,
)

AUDIT_FIELDS = {"id", "project_id", "at", "actor", "action", "target", "details"}


def audit_path(project: Project) -> str:
    return f"/v1/projects/{project.id}/audit"


def events(client: httpx.Client, project: Project, **params: str) -> list[dict[str, Any]]:
    """The project's audit trail, newest first, checked for shape."""
    response = client.get(audit_path(project), headers=project.auth, params=params)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    for event in found:
        assert set(event) == AUDIT_FIELDS
        assert event["project_id"] == str(project.id)
        assert uuid.UUID(event["id"])
        assert dt.datetime.fromisoformat(event["at"]).tzinfo is not None
        assert isinstance(event["details"], dict)
    stamps = [dt.datetime.fromisoformat(event["at"]) for event in found]
    assert stamps == sorted(stamps, reverse=True)
    return found


def actions(client: httpx.Client, project: Project) -> list[str]:
    return [event["action"] for event in events(client, project)]


def actor_of(project: Project) -> str:
    return f"token:{project.token_id}"


def test_a_new_project_starts_with_its_creation(client: httpx.Client, project: Project) -> None:
    (created,) = events(client, project)

    assert created["action"] == "project.create"
    assert created["actor"] == "cli"
    assert created["target"] == str(project.id)
    assert created["details"] == {
        "name": "test",
        "token_id": str(project.token_id),
        "environments": ["production", "staging", "development"],
    }


def test_each_bundle_change_is_recorded_with_the_acting_token(
    client: httpx.Client, project: Project
) -> None:
    bundle = uploaded(client, project, channel="staging", mandatory="true")
    path = project.path(f"/bundles/{bundle['id']}")
    assert client.post(path + "/activate", headers=project.auth).status_code == 200
    assert client.patch(path, headers=project.auth, json={"mandatory": False}).status_code == 200
    assert client.patch(path, headers=project.auth).status_code == 200  # toggles back on
    assert client.delete(path, headers=project.auth).status_code == 204

    deleted, toggled, cleared, activated, uploaded_event, _created = events(client, project)

    for event in (deleted, toggled, cleared, activated, uploaded_event):
        assert event["actor"] == actor_of(project)
        assert event["target"] == bundle["id"]
    assert uploaded_event["action"] == "bundle.upload"
    assert uploaded_event["details"] == {
        "channel": "staging",
        "version": 1,
        "mandatory": True,
        "checksum": bundle["checksum"],
        "file_size": bundle["file_size"],
    }
    assert activated["action"] == "bundle.activate"
    assert activated["details"] == {"channel": "staging", "version": 1, "deactivated": None}
    assert cleared["action"] == "bundle.mandatory"
    assert cleared["details"] == {
        "channel": "staging",
        "version": 1,
        "mandatory": False,
        "was": True,
    }
    assert toggled["action"] == "bundle.mandatory"
    assert toggled["details"]["mandatory"] is True
    assert toggled["details"]["was"] is False
    assert deleted["action"] == "bundle.delete"
    assert deleted["details"] == {
        "channel": "staging",
        "version": 1,
        "active": True,
        "mandatory": True,
    }


def test_activation_names_the_bundle_it_replaced(client: httpx.Client, project: Project) -> None:
    first = released(client, project)
    second = uploaded(client, project)

    response = client.post(project.path(f"/bundles/{second['id']}/activate"), headers=project.auth)
    assert response.status_code == 200

    latest = events(client, project)[0]
    assert latest["action"] == "bundle.activate"
    assert latest["target"] == second["id"]
    assert latest["details"] == {"channel": "production", "version": 2, "deactivated": first["id"]}


def test_activating_the_active_bundle_again_records_nothing(
    client: httpx.Client, project: Project
) -> None:
    bundle = released(client, project)
    before = events(client, project)

    response = client.post(project.path(f"/bundles/{bundle['id']}/activate"), headers=project.auth)

    assert response.status_code == 200
    assert events(client, project) == before


def test_token_and_key_changes_are_recorded_without_any_secret(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    row, token = projects.create_token(server.db, project_id=project.id, expires_in_days=30)
    key = projects.rotate_key(server.db, project_id=project.id, environment="staging")
    projects.revoke_token(server.db, token_id=row.id)
    projects.revoke_token(server.db, token_id=row.id)  # a second revoke changes nothing

    response = client.get(audit_path(project), headers=project.auth)
    revoked, rotated, created, _project = events(client, project)

    assert created["action"] == "token.create"
    assert created["actor"] == "cli"
    assert created["target"] == str(row.id)
    assert created["details"]["token_id"] == str(row.id)
    expires_at = dt.datetime.fromisoformat(created["details"]["expires_at"])
    assert abs(expires_at - (dt.datetime.now(dt.UTC) + dt.timedelta(days=30))) < dt.timedelta(
        minutes=5
    )
    assert rotated["action"] == "key.rotate"
    assert rotated["actor"] == "cli"
    assert rotated["target"] == "staging"
    assert rotated["details"] == {"environment": "staging"}
    assert revoked["action"] == "token.revoke"
    assert revoked["actor"] == "cli"
    assert revoked["target"] == str(row.id)
    # Neither the token nor any key, old or new, is in the trail.
    for secret in [token, key, project.token, *project.keys.values()]:
        assert secret not in response.text


def test_the_actor_is_the_token_that_made_the_change(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    row, token = projects.create_token(server.db, project_id=project.id)
    second = Project(id=project.id, token=token, token_id=row.id, keys=project.keys)

    bundle = uploaded(client, second)

    latest = events(client, project)[0]
    assert latest["action"] == "bundle.upload"
    assert latest["target"] == bundle["id"]
    assert latest["actor"] == f"token:{row.id}"


def test_limit_answers_the_newest_events(client: httpx.Client, project: Project) -> None:
    bundles = [uploaded(client, project) for _ in range(3)]

    newest_two = events(client, project, limit="2")
    everything = events(client, project, limit="1000")

    assert [event["target"] for event in newest_two] == [bundles[2]["id"], bundles[1]["id"]]
    assert len(everything) == 4  # three uploads and the project's creation
    assert everything[:2] == newest_two
    assert events(client, project) == everything  # the default, 100, holds them all


def test_the_default_limit_is_100(server: RunningServer, client: httpx.Client) -> None:
    project = new_project(server.db)
    for _ in range(101):
        projects.rotate_key(server.db, project_id=project.id, environment="development")

    assert len(events(client, project)) == 100
    assert len(events(client, project, limit="101")) == 101
    assert len(events(client, project, limit="1000")) == 102


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "abc", "", "1.5", "99999999"])
def test_invalid_limits_are_400(client: httpx.Client, project: Project, limit: str) -> None:
    response = client.get(audit_path(project), headers=project.auth, params={"limit": limit})
    assert_error(response, 400, "invalid_limit")


def test_the_trail_is_protected_like_the_bundle_routes(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    other = new_project(server.db)
    uploaded(client, other)

    assert_error(client.get(audit_path(project)), 401, "missing_token")
    assert_error(client.get(audit_path(project), headers=other.auth), 404, "project_not_found")
    bad = {"Authorization": "Bearer kbota_nothing"}
    assert_error(client.get(audit_path(project), headers=bad), 401, "invalid_token")
    unknown = f"/v1/projects/{uuid.uuid4()}/audit"
    assert_error(client.get(unknown, headers=project.auth), 404, "project_not_found")
    assert_error(client.get("/v1/projects/nope/audit", headers=project.auth), 404)
    # Each project sees only its own events.
    assert actions(client, project) == ["project.create"]
    assert actions(client, other) == ["bundle.upload", "project.create"]


def test_refused_changes_record_nothing(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    bundle = released(client, project)
    other = new_project(server.db)
    before = events(client, project)
    path = project.path(f"/bundles/{bundle['id']}")
    unknown = project.path(f"/bundles/{uuid.uuid4()}")

    assert upload(client, project, b"this is not a zip").status_code == 422
    assert upload(client, project, make_zip(), channel="nightly").status_code == 400
    assert upload(client, project, make_zip(), mandatory="maybe").status_code == 400
    assert client.post(unknown + "/activate", headers=project.auth).status_code == 404
    assert client.patch(unknown, headers=project.auth, json={"mandatory": True}).status_code == 404
    assert client.patch(path, headers=project.auth, json={"mandatory": "x"}).status_code == 400
    assert client.delete(unknown, headers=project.auth).status_code == 404
    # Another project's token cannot touch this project's bundle, and leaves no trace either.
    other_path = other.path(f"/bundles/{bundle['id']}")
    assert client.post(other_path + "/activate", headers=other.auth).status_code == 404
    assert client.delete(other_path, headers=other.auth).status_code == 404
    assert client.delete(path, headers=other.auth).status_code == 404

    assert events(client, project) == before
    assert actions(client, other) == ["project.create"]


def test_the_route_is_documented(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/projects/{project_id}/audit"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["type"] == "array"
    ref = schema["items"]["$ref"].rsplit("/", 1)[1]
    assert set(spec["components"]["schemas"][ref]["properties"]) == AUDIT_FIELDS
    assert {"400", "401", "404"} <= set(operation["responses"])
    assert operation["security"] == [{"HTTPBearer": []}]
