"""Channels per project: the seed channels always exist, a project adds its own, unknown ones
stay refused everywhere, and a new channel reaches every process's cached check."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from koolbase_ota.projects import channels
from tests.conftest import (
    Project,
    RunningServer,
    assert_error,
    eventually,
    new_project,
    released,
    upload,
    uploaded,
)

CHECK = "/v1/sdk/ota/check"
SEED = ["production", "staging", "development"]
CHANNEL_FIELDS = {"name", "created_at", "builtin"}


def listed(client: httpx.Client, project: Project) -> list[dict[str, Any]]:
    response = client.get(project.path("/channels"), headers=project.auth)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    for channel in found:
        assert set(channel) == CHANNEL_FIELDS
        assert dt.datetime.fromisoformat(channel["created_at"]).tzinfo is not None
    return found


def names(client: httpx.Client, project: Project) -> list[str]:
    return [channel["name"] for channel in listed(client, project)]


def add(client: httpx.Client, project: Project, body: Any) -> httpx.Response:
    return client.post(project.path("/channels"), headers=project.auth, json=body)


def added(client: httpx.Client, project: Project, name: str) -> dict[str, Any]:
    response = add(client, project, {"name": name})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def audit_actions(client: httpx.Client, project: Project) -> list[dict[str, Any]]:
    response = client.get(f"/v1/projects/{project.id}/audit", headers=project.auth)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


def test_a_new_project_has_the_three_seed_channels(client: httpx.Client, project: Project) -> None:
    found = listed(client, project)

    assert [channel["name"] for channel in found] == SEED
    assert all(channel["builtin"] for channel in found)


def test_an_added_channel_is_answered_listed_and_audited(
    client: httpx.Client, project: Project
) -> None:
    before = dt.datetime.now(dt.UTC)
    channel = added(client, project, "stable")

    assert set(channel) == CHANNEL_FIELDS
    assert channel["name"] == "stable"
    assert channel["builtin"] is False
    created_at = dt.datetime.fromisoformat(channel["created_at"])
    assert before - dt.timedelta(seconds=5) <= created_at <= dt.datetime.now(dt.UTC)
    beta = added(client, project, "beta")
    # The seed channels first, then the project's own by name, whatever the database collation.
    assert listed(client, project)[3:] == [beta, channel]
    assert names(client, project) == [*SEED, "beta", "stable"]
    (event, *_rest) = audit_actions(client, project)
    assert event["action"] == "channel.add"
    assert event["actor"] == f"token:{project.token_id}"
    assert event["target"] == "beta"
    assert event["details"] == {"channel": "beta"}


def test_an_added_channel_takes_uploads_and_checks_with_its_own_versions(
    client: httpx.Client, project: Project
) -> None:
    released(client, project, channel="production")
    released(client, project, channel="production")
    added(client, project, "stable")

    bundle = released(client, project, channel="stable")

    assert bundle["channel"] == "stable"
    assert bundle["version"] == 1
    assert bundle["storage_path"] == f"ota/{project.id}/stable/v1.zip"
    response = client.get(CHECK, params={"channel": "stable", "version": 0}, headers=project.key())
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 1
    assert response.json()["checksum"] == bundle["checksum"]
    # Every key of the project sees every channel, the added ones too.
    staging = client.get(CHECK, params={"channel": "stable"}, headers=project.key("staging"))
    assert staging.json()["version"] == 1


def test_an_unknown_channel_is_refused_until_added_and_the_check_learns_at_once(
    client: httpx.Client, project: Project
) -> None:
    params: dict[str, str | int] = {"channel": "beta", "version": 0}
    # The check caches "no such channel" for (project, beta) ...
    assert_error(client.get(CHECK, params=params, headers=project.key()), 400, "invalid_channel")
    assert_error(client.get(CHECK, params=params, headers=project.key()), 400, "invalid_channel")
    assert_error(upload(client, project, channel="beta"), 400, "invalid_channel")

    added(client, project, "beta")

    # ... and adding the channel through this process drops that entry before the answer.
    response = client.get(CHECK, params=params, headers=project.key())
    assert response.status_code == 200, response.text
    assert response.json() == {"has_update": False}
    assert uploaded(client, project, channel="beta")["version"] == 1


def test_a_channel_added_by_another_process_reaches_the_cached_check(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    params: dict[str, str | int] = {"channel": "nightly", "version": 0}
    assert_error(client.get(CHECK, params=params, headers=project.key()), 400, "invalid_channel")

    # Added by another process (here: straight through the service, as the CLI does).
    channels.add_channel(server.db, project_id=project.id, name="nightly")

    eventually(
        lambda: client.get(CHECK, params=params, headers=project.key()).status_code == 200,
        "the new channel",
    )
    assert client.get(CHECK, params=params, headers=project.key()).json() == {"has_update": False}


def test_channels_belong_to_one_project(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    other = new_project(server.db)
    added(client, project, "stable")

    assert names(client, other) == SEED
    assert_error(upload(client, other, channel="stable"), 400, "invalid_channel")
    response = client.get(CHECK, params={"channel": "stable"}, headers=other.key())
    assert_error(response, 400, "invalid_channel")
    # The other project may add the same name for itself.
    assert added(client, other, "stable")["name"] == "stable"


@pytest.mark.parametrize("name", ["stable", "production", "development"])
def test_a_name_the_project_has_is_409(client: httpx.Client, project: Project, name: str) -> None:
    added(client, project, "stable")
    before = audit_actions(client, project)

    assert_error(add(client, project, {"name": name}), 409, "channel_exists")

    assert names(client, project) == [*SEED, "stable"]
    assert audit_actions(client, project) == before


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Stable",
        "-beta",
        ".hidden",
        "_x",
        "a" * 51,
        "a/b",
        "..",
        "beta ",
        " beta",
        "bêta",
        "a\nb",
        "a%2Fb",
        5,
        None,
        ["beta"],
    ],
)
def test_a_bad_name_is_400_and_adds_nothing(
    client: httpx.Client, project: Project, name: Any
) -> None:
    assert_error(add(client, project, {"name": name}), 400, "invalid_channel")

    assert names(client, project) == SEED
    assert [event["action"] for event in audit_actions(client, project)] == ["project.create"]


def test_the_longest_and_odd_but_valid_names_are_taken(
    client: httpx.Client, project: Project
) -> None:
    for name in ("a" * 50, "0", "v2.4-rc_1"):
        assert added(client, project, name)["name"] == name
        assert uploaded(client, project, channel=name)["version"] == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b"not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'["stable"]', "invalid_body"),
        (b'"stable"', "invalid_body"),
        (b"{}", "invalid_channel"),
        (b'{"name": "stable", "builtin": true}', "invalid_body"),
    ],
)
def test_a_bad_body_is_400(client: httpx.Client, project: Project, body: bytes, code: str) -> None:
    response = client.post(
        project.path("/channels"),
        headers={**project.auth, "Content-Type": "application/json"},
        content=body,
    )
    assert_error(response, 400, code)
    assert names(client, project) == SEED


def test_a_project_holds_at_most_max_channels(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    for index in range(channels.MAX_CHANNELS - len(SEED)):
        channels.add_channel(server.db, project_id=project.id, name=f"c{index}")

    assert_error(add(client, project, {"name": "one-more"}), 409, "too_many_channels")
    assert len(listed(client, project)) == channels.MAX_CHANNELS


def test_channel_routes_need_the_projects_own_token(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    other = new_project(server.db)
    path = project.path("/channels")

    assert_error(client.get(path), 401, "missing_token")
    assert_error(client.post(path, json={"name": "beta"}), 401, "missing_token")
    assert_error(client.get(path, headers=other.auth), 404, "project_not_found")
    assert_error(client.post(path, json={"name": "beta"}, headers=other.auth), 404)

    assert names(client, project) == SEED


def test_channel_routes_are_documented(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    operations = spec["paths"]["/v1/projects/{project_id}/ota/channels"]

    assert set(operations) == {"get", "post"}
    post = operations["post"]
    assert {"201", "400", "401", "404", "409"} <= set(post["responses"])
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["name"]
    assert {"200", "401", "404"} <= set(operations["get"]["responses"])


def test_concurrent_adds_of_one_name_make_one_channel(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    racers = 8
    barrier = threading.Barrier(racers)

    def race(_index: int) -> int:
        with httpx.Client(base_url=server.base_url, timeout=30) as own:
            barrier.wait()
            return add(own, project, {"name": "beta"}).status_code

    with ThreadPoolExecutor(max_workers=racers) as pool:
        statuses = sorted(pool.map(race, range(racers)))

    assert statuses == [201] + [409] * (racers - 1)
    assert names(client, project) == [*SEED, "beta"]
    adds = [event for event in audit_actions(client, project) if event["action"] == "channel.add"]
    assert len(adds) == 1
