"""Promote: a server-side copy of a bundle into a channel as a new version, optionally activated;
the seed-compatible way to roll every device back."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from koolbase_ota.bundles.models import PendingObject
from koolbase_ota.storage.local import LocalStore
from tests.conftest import (
    BUNDLE_FIELDS,
    Project,
    RunningServer,
    assert_error,
    make_zip,
    new_project,
    released,
    upload,
    uploaded,
)

CHECK = "/v1/sdk/ota/check"


def promote(
    client: httpx.Client, project: Project, bundle_id: str, body: Any, **kwargs: Any
) -> httpx.Response:
    return client.post(
        project.path(f"/bundles/{bundle_id}/promote"), headers=project.auth, json=body, **kwargs
    )


def promoted(client: httpx.Client, project: Project, bundle_id: str, **body: Any) -> dict[str, Any]:
    response = promote(client, project, bundle_id, body)
    assert response.status_code == 201, response.text
    found: dict[str, Any] = response.json()
    assert set(found) == BUNDLE_FIELDS
    return found


def bundles(client: httpx.Client, project: Project) -> list[dict[str, Any]]:
    response = client.get(project.path("/bundles"), headers=project.auth)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


def audit_trail(client: httpx.Client, project: Project) -> list[dict[str, Any]]:
    response = client.get(f"/v1/projects/{project.id}/audit", headers=project.auth)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


def uploaded_zip(
    client: httpx.Client, project: Project, content: str, **fields: str
) -> tuple[dict[str, Any], bytes]:
    data = make_zip({"config.json": content})
    response = upload(client, project, data, **fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body, data


def activate(client: httpx.Client, project: Project, bundle_id: str) -> None:
    response = client.post(project.path(f"/bundles/{bundle_id}/activate"), headers=project.auth)
    assert response.status_code == 200, response.text


def pending_paths(server: RunningServer) -> set[str]:
    with server.db.read() as session:
        return set(session.scalars(select(PendingObject.storage_path)))


def check(client: httpx.Client, project: Project, **params: Any) -> dict[str, Any]:
    response = client.get(CHECK, params=params, headers=project.key())
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def test_promote_copies_into_another_channel_as_its_next_version(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    source, data = uploaded_zip(
        client,
        project,
        '{"banner": "tested on staging"}',
        channel="staging",
        release_notes="Tested",
        platform="android",
        min_app_version="2.0.0",
        max_app_version="2.9",
    )
    uploaded(client, project, channel="production")

    copy = promoted(client, project, source["id"], channel="production")

    assert copy["id"] != source["id"]
    assert copy["channel"] == "production"
    assert copy["version"] == 2
    assert copy["storage_path"] == f"ota/{project.id}/production/v2.zip"
    assert copy["checksum"] == source["checksum"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert copy["file_size"] == source["file_size"] == len(data)
    assert copy["promoted_from"] == source["id"]
    assert copy["release_notes"] == "Tested"
    assert (copy["platform"], copy["min_app_version"], copy["max_app_version"]) == (
        "android",
        "2.0.0",
        "2.9",
    )
    assert copy["active"] is False
    assert copy["mandatory"] is False
    assert copy["rollout_percentage"] == 100
    assert copy["released_at"] is None
    assert copy["recalled_at"] is None
    # The copy is really in the store, byte for byte, and the source is untouched.
    assert server.object_exists(copy["storage_path"])
    assert server.read_object(copy["storage_path"]) == data
    assert server.read_object(source["storage_path"]) == data
    listed = {bundle["id"]: bundle for bundle in bundles(client, project)}
    assert listed[copy["id"]] == copy
    assert listed[source["id"]] == source
    assert pending_paths(server) == set()
    (event, *_rest) = audit_trail(client, project)
    assert event["action"] == "bundle.promote"
    assert event["actor"] == f"token:{project.token_id}"
    assert event["target"] == copy["id"]
    assert event["details"]["from"] == source["id"]
    assert event["details"]["channel"] == "production"
    assert event["details"]["version"] == 2
    assert event["details"]["from_channel"] == "staging"


def test_the_copys_version_is_never_one_given_out_before(
    client: httpx.Client, project: Project
) -> None:
    source = uploaded(client, project, channel="staging")
    uploaded(client, project, channel="production")
    doomed = uploaded(client, project, channel="production")
    response = client.delete(project.path(f"/bundles/{doomed['id']}"), headers=project.auth)
    assert response.status_code == 204

    assert promoted(client, project, source["id"], channel="production")["version"] == 3
    assert promoted(client, project, source["id"], channel="production")["version"] == 4
    assert uploaded(client, project, channel="production")["version"] == 5


def test_promote_and_activate_at_a_rollout(client: httpx.Client, project: Project) -> None:
    head = released(client, project, channel="production")
    source = released(client, project, channel="staging")

    copy = promoted(
        client, project, source["id"], channel="production", activate=True, rollout_percentage=30
    )

    assert copy["active"] is True
    assert copy["rollout_percentage"] == 30
    assert copy["released_at"] is not None
    listed = {bundle["id"]: bundle for bundle in bundles(client, project)}
    assert listed[head["id"]]["active"] is False
    assert listed[source["id"]]["active"] is True  # its own channel keeps it
    actions = [event["action"] for event in audit_trail(client, project)[:2]]
    assert actions == ["bundle.activate", "bundle.promote"]


def test_rollout_without_activate_is_kept_for_a_later_activation(
    client: httpx.Client, project: Project
) -> None:
    source = uploaded(client, project, channel="staging")

    copy = promoted(client, project, source["id"], channel="production", rollout_percentage=10)

    assert copy["active"] is False
    assert copy["rollout_percentage"] == 10


def test_re_releasing_an_old_bundle_rolls_seed_devices_back(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    good, good_zip = uploaded_zip(client, project, '{"banner": "good"}')
    activate(client, project, good["id"])
    bad, _bad_zip = uploaded_zip(client, project, '{"banner": "bad"}')
    activate(client, project, bad["id"])
    assert check(client, project, version=1)["version"] == 2
    # Activating the good one again does not reach devices on the bad one: the seed SDK only
    # takes a newer version. A promote into the same channel makes that newer version.
    copy = promoted(client, project, good["id"], channel="production", activate=True)

    assert copy["version"] == 3
    answer = check(client, project, version=2)  # a device on the bad release
    assert answer["has_update"] is True
    assert answer["version"] == 3
    assert answer["checksum"] == good["checksum"]
    downloaded = httpx.get(answer["download_url"], timeout=30)
    assert downloaded.status_code == 200
    assert downloaded.content == good_zip
    assert "sha256:" + hashlib.sha256(downloaded.content).hexdigest() == answer["checksum"]
    assert check(client, project, version=0)["version"] == 3
    assert check(client, project, version=3) == {"has_update": False}


def test_release_notes_and_mandatory_can_be_given(client: httpx.Client, project: Project) -> None:
    source = uploaded(client, project, channel="staging", release_notes="Old notes")

    given = promoted(
        client,
        project,
        source["id"],
        channel="production",
        release_notes="Fixed copy",
        mandatory=True,
    )
    cleared = promoted(client, project, source["id"], channel="production", release_notes=None)
    empty = promoted(client, project, source["id"], channel="production", release_notes="")

    assert (given["release_notes"], given["mandatory"]) == ("Fixed copy", True)
    assert cleared["release_notes"] is None
    assert empty["release_notes"] is None
    assert cleared["mandatory"] is False


def test_promote_into_an_added_channel(client: httpx.Client, project: Project) -> None:
    response = client.post(project.path("/channels"), headers=project.auth, json={"name": "beta"})
    assert response.status_code == 201, response.text
    source = released(client, project, channel="staging")

    copy = promoted(client, project, source["id"], channel="beta", activate=True)

    assert (copy["channel"], copy["version"]) == ("beta", 1)
    answer = check(client, project, channel="beta", version=0)
    assert answer["version"] == 1
    assert answer["checksum"] == source["checksum"]


def assert_nothing_changed(
    server: RunningServer,
    client: httpx.Client,
    project: Project,
    *,
    keys: set[str],
    listed: list[dict[str, Any]],
    trail: list[dict[str, Any]],
) -> None:
    assert server.stored_keys() == keys
    assert bundles(client, project) == listed
    assert audit_trail(client, project) == trail
    assert pending_paths(server) == set()


def test_refusals_leave_nothing_behind(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    source = released(client, project, channel="staging")
    other = new_project(server.db)
    recalled = released(client, project, channel="development")
    response = client.post(project.path(f"/bundles/{recalled['id']}/recall"), headers=project.auth)
    assert response.status_code == 200, response.text
    keys = server.stored_keys()
    listed = bundles(client, project)
    trail = audit_trail(client, project)

    assert_error(
        promote(client, project, source["id"], {"channel": "nightly"}), 400, "invalid_channel"
    )
    assert_error(
        promote(client, project, str(uuid.uuid4()), {"channel": "production"}),
        404,
        "bundle_not_found",
    )
    assert_error(
        promote(client, project, "not-a-uuid", {"channel": "production"}), 404, "bundle_not_found"
    )
    # Another project's token sees neither the project nor its bundle.
    response = client.post(
        project.path(f"/bundles/{source['id']}/promote"),
        headers=other.auth,
        json={"channel": "production"},
    )
    assert_error(response, 404, "project_not_found")
    assert_error(
        promote(client, other, source["id"], {"channel": "production"}), 404, "bundle_not_found"
    )
    response = client.post(
        project.path(f"/bundles/{source['id']}/promote"), json={"channel": "production"}
    )
    assert_error(response, 401, "missing_token")
    assert_error(
        promote(client, project, recalled["id"], {"channel": "production"}), 409, "bundle_recalled"
    )

    assert_nothing_changed(server, client, project, keys=keys, listed=listed, trail=trail)
    # No version was taken by a refusal either.
    assert uploaded(client, project, channel="production")["version"] == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "invalid_channel"),
        ({"channel": ""}, "invalid_channel"),
        ({"channel": 5}, "invalid_channel"),
        ({"channel": "production", "activate": "yes"}, "invalid_activate"),
        ({"channel": "production", "mandatory": 1}, "invalid_mandatory"),
        ({"channel": "production", "rollout_percentage": 0}, "invalid_rollout_percentage"),
        ({"channel": "production", "rollout_percentage": 101}, "invalid_rollout_percentage"),
        ({"channel": "production", "rollout_percentage": "50"}, "invalid_rollout_percentage"),
        ({"channel": "production", "rollout_percentage": 5.5}, "invalid_rollout_percentage"),
        ({"channel": "production", "release_notes": 5}, "invalid_release_notes"),
        ({"channel": "production", "release_notes": "x" * 10_001}, "invalid_release_notes"),
        ({"channel": "production", "version": 9}, "invalid_body"),
        (["production"], "invalid_body"),
    ],
)
def test_a_bad_body_is_400(
    server: RunningServer, client: httpx.Client, project: Project, body: Any, code: str
) -> None:
    source = uploaded(client, project, channel="staging")
    keys = server.stored_keys()

    assert_error(promote(client, project, source["id"], body), 400, code)

    assert server.stored_keys() == keys
    assert len(bundles(client, project)) == 1


@pytest.mark.parametrize("raw", [b"", b"not json", b"\xff"])
def test_a_body_that_is_not_json_is_400(client: httpx.Client, project: Project, raw: bytes) -> None:
    source = uploaded(client, project, channel="staging")
    response = client.post(
        project.path(f"/bundles/{source['id']}/promote"),
        headers={**project.auth, "Content-Type": "application/json"},
        content=raw,
    )
    assert_error(response, 400, "invalid_json")


def test_a_source_whose_file_is_gone_is_404_and_leaves_no_record(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    source = uploaded(client, project, channel="staging")
    # The fault, caused for real: the object vanished from the store behind the server's back.
    asyncio.run(server.store.delete(source["storage_path"]))
    keys = server.stored_keys()

    assert_error(
        promote(client, project, source["id"], {"channel": "production"}), 404, "bundle_not_found"
    )

    assert server.stored_keys() == keys
    assert pending_paths(server) == set()
    assert [bundle["id"] for bundle in bundles(client, project)] == [source["id"]]


def test_the_route_is_documented(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/projects/{project_id}/ota/bundles/{bundle_id}/promote"]["post"]

    assert {"201", "400", "401", "404", "409"} <= set(operation["responses"])
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["channel"]
    assert set(body["properties"]) == {
        "channel",
        "activate",
        "rollout_percentage",
        "release_notes",
        "mandatory",
    }


def test_concurrent_promotes_take_distinct_versions(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    source, data = uploaded_zip(client, project, '{"banner": "raced"}', channel="staging")
    racers = 6
    barrier = threading.Barrier(racers)

    def race(_index: int) -> dict[str, Any]:
        with httpx.Client(base_url=server.base_url, timeout=30) as own:
            barrier.wait()
            response = promote(own, project, source["id"], {"channel": "production"})
            assert response.status_code == 201, response.text
            found: dict[str, Any] = response.json()
            return found

    with ThreadPoolExecutor(max_workers=racers) as pool:
        copies = list(pool.map(race, range(racers)))

    assert sorted(copy["version"] for copy in copies) == list(range(1, racers + 1))
    for copy in copies:
        assert server.read_object(copy["storage_path"]) == data
    assert pending_paths(server) == set()


def test_an_object_already_at_the_target_is_left_alone(
    server: RunningServer, client: httpx.Client, project: Project, tmp_path: Path
) -> None:
    source = uploaded(client, project, channel="staging")
    # The fault, caused for real: something else (another install sharing the store's prefix)
    # already wrote the object the next production version would take.
    foreign = tmp_path / "foreign.zip"
    foreign.write_bytes(b"not ours")
    target = f"ota/{project.id}/production/v1.zip"
    asyncio.run(server.store.put_file(target, foreign))

    response = promote(client, project, source["id"], {"channel": "production"})

    assert_error(response, 503, "object_exists")
    store = server.store
    if isinstance(store, LocalStore):  # local downloads serve only what a bundle row names
        assert store.path_for(target).read_bytes() == b"not ours"
    else:
        assert server.read_object(target) == b"not ours"
    assert pending_paths(server) == set()
    assert [bundle["id"] for bundle in bundles(client, project)] == [source["id"]]
    # The version stays taken, so the next promote goes past the foreign object.
    assert promoted(client, project, source["id"], channel="production")["version"] == 2
