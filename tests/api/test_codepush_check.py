"""`GET /v1/code-push/check` (issue 6): the check of the vendor's current SDKs."""

from __future__ import annotations

import hashlib
import hmac
import json
import re

import httpx
import pytest

from tests.api.release import CODE_PUSH, add_stable, code_push, release
from tests.conftest import Project, RunningServer, assert_error, eventually, new_project


def test_an_update_has_exactly_the_fields_the_clients_read(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    bundle = release(client, project, mandatory="true")
    body = code_push(client, project, current_bundle=0)
    assert set(body) == {"status", "bundle"}
    assert body["status"] == "update_available"
    offer = body["bundle"]
    assert set(offer) == {
        "bundle_id",
        "version",
        "download_url",
        "checksum",
        "signature",
        "size_bytes",
        "mandatory",
    }
    assert offer["bundle_id"] == bundle["id"]
    assert re.fullmatch(r"[0-9a-f-]{36}", offer["bundle_id"])  # a safe file name
    assert (offer["version"], offer["mandatory"]) == (bundle["version"], True)
    assert (offer["checksum"], offer["size_bytes"]) == (bundle["checksum"], bundle["file_size"])
    # The documented signature: HMAC-SHA-256 of the checksum under the server's secret key.
    expected = hmac.new(
        server.settings.secret_key.encode(), bundle["checksum"].encode(), hashlib.sha256
    ).hexdigest()
    assert offer["signature"] == "hmac-sha256:" + expected
    # The download is the zip whose SHA-256 the checksum names, fetched with no headers.
    download = httpx.get(offer["download_url"], timeout=30)
    assert download.status_code == 200
    assert "sha256:" + hashlib.sha256(download.content).hexdigest() == offer["checksum"]


def test_no_update_when_the_device_is_current_or_nothing_is_released(
    client: httpx.Client, project: Project
) -> None:
    assert code_push(client, project) == {"status": "no_update"}
    bundle = release(client, project)
    assert code_push(client, project, current_bundle=bundle["version"]) == {"status": "no_update"}
    assert code_push(client, project, current_bundle=99) == {"status": "no_update"}
    response = client.get(
        CODE_PUSH, params={"channel": "production", "current_bundle": 99}, headers=project.key()
    )
    assert response.content == b'{"status":"no_update"}'
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"


def test_the_default_channel_is_stable(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    release(client, project)  # on production
    response = client.get(CODE_PUSH, headers=project.key())
    assert_error(response, 400, "invalid_channel")  # the project has no `stable` yet
    add_stable(server, project)
    # Added behind the server's back (as by the CLI): the change log tells its cache.
    eventually(
        lambda: client.get(CODE_PUSH, headers=project.key()).json() == {"status": "no_update"},
        "the new channel",
    )
    bundle = release(client, project, channel="stable")
    body = client.get(
        CODE_PUSH,
        params={"app_version": "2.4.1", "platform": "ios", "device_id": "x", "current_bundle": 0},
        headers=project.key(),
    ).json()
    assert body["status"] == "update_available"
    assert body["bundle"]["bundle_id"] == bundle["id"]


def test_every_key_of_the_project_sees_every_channel(
    client: httpx.Client, project: Project
) -> None:
    bundle = release(client, project, channel="staging")
    response = client.get(
        CODE_PUSH, params={"channel": "staging"}, headers=project.key("development")
    )
    assert response.json()["bundle"]["version"] == bundle["version"]


@pytest.mark.parametrize(
    ("params", "headers", "status", "code"),
    [
        ({}, {}, 401, "missing_api_key"),
        ({}, {"x-api-key": "pk_live_" + "0" * 24}, 401, "invalid_api_key"),
        ({"current_bundle": "-1"}, None, 400, "invalid_current_bundle"),
        ({"current_bundle": "1.0"}, None, 400, "invalid_current_bundle"),
        ({"current_bundle": "x"}, None, 400, "invalid_current_bundle"),
        ({"channel": "nope"}, None, 400, "invalid_channel"),
        ({"channel": "c" * 51}, None, 400, "invalid_channel"),
        ({"app_version": "latest"}, None, 400, "invalid_app_version"),
    ],
)
def test_errors_are_json_with_codes(
    client: httpx.Client,
    project: Project,
    params: dict[str, str],
    headers: dict[str, str] | None,
    status: int,
    code: str,
) -> None:
    release(client, project)
    response = client.get(
        CODE_PUSH,
        params={"channel": "production", **params},
        headers=project.key() if headers is None else headers,
    )
    assert_error(response, status, code)


def test_another_projects_key_does_not_see_the_bundle(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    release(client, project)
    other = new_project(server.db, name="other")
    assert code_push(client, other) == {"status": "no_update"}


def test_the_route_is_in_openapi_with_its_errors(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    operation = document["paths"][CODE_PUSH]["get"]
    assert {"200", "400", "401", "503"} <= set(operation["responses"])
    names = {parameter["name"] for parameter in operation["parameters"]}
    assert {"app_version", "platform", "channel", "device_id", "current_bundle"} <= names
    check = document["paths"]["/v1/sdk/ota/check"]["get"]
    assert {"app_version", "platform", "device_id"} <= {p["name"] for p in check["parameters"]}
    recall = document["paths"]["/v1/projects/{project_id}/ota/bundles/{bundle_id}/recall"]
    assert {"200", "400", "401", "404"} <= set(recall["post"]["responses"])
    activate = document["paths"]["/v1/projects/{project_id}/ota/bundles/{bundle_id}/activate"]
    assert "409" in activate["post"]["responses"]
    body = json.dumps(activate["post"]["requestBody"])
    assert "rollout_percentage" in body
