"""`GET /v1/sdk/ota/check`: what the Flutter SDK asks at every launch, and exactly what it gets."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import httpx
import pytest

from koolbase_ota.projects import service as projects
from tests.conftest import (
    OFFER_FIELDS,
    Project,
    RunningServer,
    assert_error,
    eventually,
    make_zip,
    new_project,
    released,
    upload,
    uploaded,
)

CHECK = "/v1/sdk/ota/check"


def check(
    client: httpx.Client,
    project: Project,
    *,
    environment: str = "production",
    **params: str | int,
) -> httpx.Response:
    return client.get(CHECK, params=params, headers=project.key(environment))


def offer(
    client: httpx.Client, project: Project, *, channel: str = "production", version: int = 0
) -> dict[str, Any]:
    """A check that must answer an update, with every field of the document."""
    response = check(client, project, channel=channel, version=version)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["has_update"] is True, body
    assert set(body) == OFFER_FIELDS
    return body


def activate(client: httpx.Client, project: Project, bundle: dict[str, Any]) -> None:
    response = client.post(project.path(f"/bundles/{bundle['id']}/activate"), headers=project.auth)
    assert response.status_code == 200, response.text


# Keys


def test_a_missing_api_key_is_401(client: httpx.Client, project: Project) -> None:
    released(client, project)
    assert_error(client.get(CHECK), 401, "missing_api_key")
    assert_error(client.get(CHECK, headers={"x-api-key": ""}), 401, "missing_api_key")


@pytest.mark.parametrize(
    "key", ["pk_live_000000000000000000000000", "pk_test_nope", "not-a-key", "x" * 500]
)
def test_an_unknown_api_key_is_401(client: httpx.Client, project: Project, key: str) -> None:
    released(client, project)
    assert_error(client.get(CHECK, headers={"x-api-key": key}), 401, "invalid_api_key")


def test_public_keys_have_the_documented_shape(project: Project) -> None:
    assert re.fullmatch(r"pk_live_[0-9a-f]{24}", project.keys["production"])
    assert re.fullmatch(r"pk_test_[0-9a-f]{24}", project.keys["staging"])
    assert re.fullmatch(r"pk_test_[0-9a-f]{24}", project.keys["development"])


@pytest.mark.parametrize("environment", ["production", "staging", "development"])
@pytest.mark.parametrize("channel", ["production", "staging", "development"])
def test_every_environment_key_sees_every_channel(
    client: httpx.Client, project: Project, environment: str, channel: str
) -> None:
    bundle = released(client, project, channel=channel)
    response = check(client, project, environment=environment, channel=channel, version=0)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == bundle["version"]


def test_a_key_never_sees_another_projects_bundles(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    other = new_project(server.db)
    for channel in ("production", "staging", "development"):
        released(client, other, channel=channel)
        response = check(client, project, channel=channel, version=0)
        assert response.status_code == 200
        assert response.json() == {"has_update": False}


def test_a_rotated_key_stops_working_within_the_refresh_bound(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    bundle = released(client, project)
    old_key = project.keys["production"]
    assert check(client, project).status_code == 200

    # Rotated by another process (here: straight through the service, as the CLI does).
    new_key = projects.rotate_key(server.db, project_id=project.id, environment="production")

    assert new_key != old_key
    eventually(
        lambda: client.get(CHECK, headers={"x-api-key": old_key}).status_code == 401,
        "key rotation",
    )
    assert_error(client.get(CHECK, headers={"x-api-key": old_key}), 401, "invalid_api_key")
    response = client.get(CHECK, headers={"x-api-key": new_key})
    assert response.status_code == 200
    assert response.json()["version"] == bundle["version"]
    # The other environments keep their keys.
    assert check(client, project, environment="staging").status_code == 200


# Parameters


def test_channel_defaults_to_production(client: httpx.Client, project: Project) -> None:
    released(client, project, channel="staging")
    production = released(client, project, channel="production")
    released(client, project, channel="staging")
    response = check(client, project, version=0)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == production["version"] == 1


@pytest.mark.parametrize(
    "channel", ["beta", "Production", "stable", "production ", "production\x00", "p" * 51]
)
def test_an_unknown_channel_is_400(client: httpx.Client, project: Project, channel: str) -> None:
    released(client, project)
    assert_error(check(client, project, channel=channel), 400, "invalid_channel")


def test_version_defaults_to_0(client: httpx.Client, project: Project) -> None:
    bundle = released(client, project)
    response = check(client, project, channel="production")
    assert response.status_code == 200, response.text
    assert response.json()["version"] == bundle["version"]


@pytest.mark.parametrize(
    "version", ["-1", "1.5", "abc", "", " ", "1e3", "0x1", "+1", "1 ", "٣", "9" * 19]
)
def test_a_version_that_is_not_a_non_negative_integer_is_400(
    client: httpx.Client, project: Project, version: str
) -> None:
    released(client, project)
    response = check(client, project, version=version)
    assert_error(response, 400, "invalid_version")
    # The bound is named (a 19-digit version was refused as "not a non-negative integer").
    assert "at most 18 digits" in response.json()["error"]


# Answers


def test_no_active_bundle_is_exactly_no_update(client: httpx.Client, project: Project) -> None:
    uploaded(client, project)
    response = check(client, project, version=0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"has_update": False}


@pytest.mark.parametrize("version", [2, 3, 1000])
def test_an_active_bundle_not_newer_is_exactly_no_update(
    client: httpx.Client, project: Project, version: int
) -> None:
    uploaded(client, project)
    released(client, project)
    response = check(client, project, version=version)
    assert response.status_code == 200
    assert response.json() == {"has_update": False}


def test_a_newer_active_bundle_is_offered_with_the_documented_fields(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    uploaded(client, project)
    bundle = released(client, project, release_notes="Updated banner and config")
    body = offer(client, project, channel="production", version=1)
    assert body == {
        "has_update": True,
        "version": 2,
        "checksum": bundle["checksum"],
        "mandatory": False,
        "download_url": body["download_url"],
        "release_notes": "Updated banner and config",
        "file_size": bundle["file_size"],
    }
    assert type(body["version"]) is int
    assert type(body["file_size"]) is int
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", body["checksum"])
    assert isinstance(body["download_url"], str)
    # This server on the embedded default; the object store itself on S3.
    serving = server.base_url if server.serves_downloads else server.settings.s3_endpoint
    assert body["download_url"].startswith(serving + "/")


def test_release_notes_are_null_when_absent(client: httpx.Client, project: Project) -> None:
    released(client, project)
    assert offer(client, project)["release_notes"] is None


def test_the_checksum_is_the_sha256_of_the_bytes_at_download_url(
    client: httpx.Client, project: Project
) -> None:
    content = make_zip({"config.json": '{"banner": "checksum"}', "img/logo.txt": "x" * 1000})
    assert upload(client, project, content).status_code == 201
    bundle = client.get(project.path("/bundles"), headers=project.auth).json()[0]
    activate(client, project, bundle)

    body = offer(client, project)
    download = httpx.get(body["download_url"])  # a plain GET, no headers, as the SDK does
    assert download.status_code == 200
    assert download.content == content
    assert body["checksum"] == "sha256:" + hashlib.sha256(download.content).hexdigest()
    assert body["file_size"] == len(download.content)


# Mandatory


def test_mandatory_when_the_active_bundle_is_mandatory(
    client: httpx.Client, project: Project
) -> None:
    bundle = released(client, project, mandatory="true")
    assert offer(client, project)["mandatory"] is True

    response = client.patch(project.path(f"/bundles/{bundle['id']}"), headers=project.auth)
    assert response.status_code == 200
    assert offer(client, project)["mandatory"] is False


def test_a_skipped_mandatory_release_still_forces_the_update(
    client: httpx.Client, project: Project
) -> None:
    released(client, project, mandatory="true")
    released(client, project, mandatory="false")
    skipped = offer(client, project, version=0)
    assert skipped["version"] == 2
    assert skipped["mandatory"] is True
    applied = offer(client, project, version=1)
    assert applied["version"] == 2
    assert applied["mandatory"] is False


def test_a_mandatory_bundle_never_activated_does_not_count(
    client: httpx.Client, project: Project
) -> None:
    uploaded(client, project, mandatory="true")
    released(client, project, mandatory="false")
    body = offer(client, project, version=0)
    assert body["version"] == 2
    assert body["mandatory"] is False


def test_a_mandatory_release_of_another_channel_does_not_count(
    client: httpx.Client, project: Project
) -> None:
    released(client, project, channel="staging", mandatory="true")
    released(client, project, channel="staging", mandatory="true")
    released(client, project, mandatory="false")
    assert offer(client, project, version=0)["mandatory"] is False
