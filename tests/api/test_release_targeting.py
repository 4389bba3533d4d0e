"""Targeting (issue 6): platform and app version range, at upload and by PATCH, in both checks."""

from __future__ import annotations

import httpx
import pytest

from koolbase_ota import audit
from tests.api.release import (
    CHECK,
    CODE_PUSH,
    activate,
    offered,
    patch,
    recall,
    release,
    seed_check,
)
from tests.conftest import Project, RunningServer, assert_error, new_project, upload, uploaded


def test_upload_takes_targeting_and_the_bundle_object_shows_it(
    client: httpx.Client, project: Project
) -> None:
    bundle = uploaded(
        client, project, platform="iOS", min_app_version="2.04", max_app_version="3.0.0"
    )
    assert bundle["platform"] == "ios"
    assert bundle["min_app_version"] == "2.4"  # canonical form
    assert bundle["max_app_version"] == "3.0.0"
    assert bundle["rollout_percentage"] == 100
    assert bundle["released_at"] is None
    assert bundle["recalled_at"] is None
    plain = uploaded(client, project)
    assert (plain["platform"], plain["min_app_version"], plain["max_app_version"]) == (
        None,
        None,
        None,
    )


def test_platform_targeting(client: httpx.Client, project: Project) -> None:
    base = release(client, project)
    ios = release(client, project, platform="ios")
    assert offered(client, project, platform="ios") == ios["version"]
    assert offered(client, project, platform="IOS") == ios["version"]
    assert offered(client, project, platform="android") == base["version"]
    # A fallback platform or none at all only gets bundles without a platform restriction.
    assert offered(client, project, platform="flutter") == base["version"]
    assert offered(client, project) == base["version"]


def test_app_version_bounds_are_inclusive_and_numeric(
    client: httpx.Client, project: Project
) -> None:
    base = release(client, project)
    ranged = release(client, project, min_app_version="2.9.0", max_app_version="2.10.0")
    for inside in ("2.9.0", "2.9", "2.9.5", "2.10.0", "2.10"):
        assert offered(client, project, app_version=inside) == ranged["version"], inside
    # 2.10.1 > 2.10.0 and 2.8.99 < 2.9.0 numerically, though not as text.
    for outside in ("2.8.99", "2.10.1", "10.0", "1"):
        assert offered(client, project, app_version=outside) == base["version"], outside
    # A device that does not say its app version is not served a version-restricted bundle.
    assert offered(client, project) == base["version"]


def test_a_label_after_the_app_version_is_not_compared(
    client: httpx.Client, project: Project
) -> None:
    """Android flavors add a label to `versionName` (`2.4.1-staging`, `2.4.1.debug`), builds
    a number (`2.4.1+45`), pre-releases a letter (`2.4.1rc1`; 400 before, so such a device got
    no update at all): the device is matched by the number before it."""
    base = release(client, project)
    ranged = release(client, project, min_app_version="2.4.1", max_app_version="2.4.9")
    for labelled in (
        "2.4.1-staging",
        "2.4.1.debug",
        "2.4.1+45",
        "2.4.9 (45)",
        "2.4.5_qa",
        "2.4.1rc1",
        "2.4.9b3",
        "2.4.5beta",
    ):
        assert offered(client, project, app_version=labelled) == ranged["version"], labelled
    for labelled in ("2.4.0-staging", "2.4.10.debug", "2.5+45", "2.4.0rc1", "2.4.10b"):
        assert offered(client, project, app_version=labelled) == base["version"], labelled


def test_an_open_ended_range(client: httpx.Client, project: Project) -> None:
    release(client, project)
    newer = release(client, project, min_app_version="2.10.0")
    assert offered(client, project, app_version="2.9.0") == newer["version"] - 1
    assert offered(client, project, app_version="2.10.0") == newer["version"]
    assert offered(client, project, app_version="999999.0") == newer["version"]


def test_the_walk_goes_back_past_bundles_that_do_not_match(
    client: httpx.Client, project: Project
) -> None:
    first = release(client, project)
    second = release(client, project, platform="android")
    release(client, project, platform="ios", min_app_version="3.0")
    release(client, project, max_app_version="1.0")
    device = {"platform": "android", "app_version": "2.0.0"}
    assert offered(client, project, **device) == second["version"]
    assert offered(client, project, current_bundle=second["version"], **device) == 0
    assert offered(client, project, platform="ios", app_version="2.0.0") == first["version"]
    assert offered(client, project, current_bundle=first["version"]) == 0


def test_no_matching_release_is_no_update(client: httpx.Client, project: Project) -> None:
    release(client, project, platform="ios")
    assert seed_check(client, project) == {"has_update": False}
    assert offered(client, project, platform="android") == 0


def test_patch_changes_and_clears_targeting(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    base = release(client, project)
    head = release(client, project)
    assert offered(client, project, platform="android") == head["version"]
    response = patch(client, project, head["id"], {"platform": "ios", "min_app_version": "2.0"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["platform"], body["min_app_version"], body["mandatory"]) == ("ios", "2.0", False)
    # The cached answers follow at once.
    assert offered(client, project, platform="android") == base["version"]
    assert offered(client, project, platform="ios", app_version="2.0") == head["version"]
    response = patch(client, project, head["id"], {"platform": None, "min_app_version": None})
    assert response.status_code == 200, response.text
    assert (response.json()["platform"], response.json()["min_app_version"]) == (None, None)
    assert offered(client, project, platform="android") == head["version"]
    events = audit.list_events(server.db, project_id=project.id, limit=5)
    assert [event.action for event in events[:2]] == [audit.BUNDLE_UPDATE, audit.BUNDLE_UPDATE]
    assert events[0].details["platform"] == {"from": "ios", "to": None}
    assert events[1].details["min_app_version"] == {"from": None, "to": "2.0"}


def test_patch_keeps_the_seed_toggle(client: httpx.Client, project: Project) -> None:
    bundle = uploaded(client, project)
    path = project.path(f"/bundles/{bundle['id']}")
    assert client.patch(path, headers=project.auth).json()["mandatory"] is True
    assert patch(client, project, bundle["id"], {}).json()["mandatory"] is False
    # A body with only targeting fields leaves the flag alone; with both, both change.
    assert patch(client, project, bundle["id"], {"platform": "ios"}).json()["mandatory"] is False
    both = patch(client, project, bundle["id"], {"platform": "android", "mandatory": True}).json()
    assert (both["platform"], both["mandatory"]) == ("android", True)


BAD_UPLOAD_FIELDS = [
    ({"platform": "windows"}, "invalid_platform"),
    ({"platform": "flutter"}, "invalid_platform"),
    ({"min_app_version": "2.x"}, "invalid_min_app_version"),
    ({"min_app_version": "1.2.3.4.5"}, "invalid_min_app_version"),
    ({"max_app_version": "1234567"}, "invalid_max_app_version"),
    ({"max_app_version": "-1"}, "invalid_max_app_version"),
    ({"max_app_version": "v2"}, "invalid_max_app_version"),
    ({"max_app_version": "２.0"}, "invalid_max_app_version"),  # noqa: RUF001  (a full-width digit)
    ({"min_app_version": "2.10", "max_app_version": "2.9"}, "invalid_app_version_range"),
]


@pytest.mark.parametrize(("fields", "code"), BAD_UPLOAD_FIELDS)
def test_bad_targeting_at_upload_is_400_and_stores_nothing(
    server: RunningServer, client: httpx.Client, project: Project, fields: dict[str, str], code: str
) -> None:
    assert_error(upload(client, project, None, **fields), 400, code)
    assert client.get(project.path("/bundles"), headers=project.auth).json() == []
    assert uploaded(client, project)["version"] == 1  # no version was used up


BAD_PATCHES = [
    ({"platform": "web"}, "invalid_platform"),
    ({"platform": 1}, "invalid_platform"),
    ({"platform": ""}, "invalid_body"),
    ({"min_app_version": "1..2"}, "invalid_min_app_version"),
    ({"min_app_version": 2}, "invalid_min_app_version"),
    ({"max_app_version": "2.0", "min_app_version": "3.0"}, "invalid_app_version_range"),
    ({"max_app_version": "1.0"}, "invalid_app_version_range"),  # below the stored minimum
    ({"rollout_percentage": 0}, "invalid_rollout_percentage"),
    ({"rollout_percentage": 101}, "invalid_rollout_percentage"),
    ({"rollout_percentage": "x"}, "invalid_rollout_percentage"),
    ({"rollout_percentage": 50.5}, "invalid_rollout_percentage"),
    ({"rollout_percentage": True}, "invalid_rollout_percentage"),
    ({"rollout_percentage": None}, "invalid_rollout_percentage"),
    ({"platform": "ios", "mandatory": "yes"}, "invalid_mandatory"),
    # Beside other fields null toggled the flag: a client sending the whole object back with
    # its targeting cleared flipped it on every save.
    ({"platform": None, "mandatory": None}, "invalid_mandatory"),
    ({"rollout_percentage": 20, "mandatory": None}, "invalid_mandatory"),
    ({"platform": "ios", "colour": "red"}, "invalid_body"),
]


@pytest.mark.parametrize(("body", "code"), BAD_PATCHES)
def test_bad_patches_are_400_and_change_nothing(
    client: httpx.Client, project: Project, body: dict[str, object], code: str
) -> None:
    bundle = uploaded(client, project, min_app_version="1.5")
    assert_error(patch(client, project, bundle["id"], body), 400, code)
    assert client.get(project.path("/bundles"), headers=project.auth).json() == [bundle]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"app_version": "latest"}, "invalid_app_version"),
        ({"app_version": "2,4"}, "invalid_app_version"),
        ({"app_version": "1.2.3.4.5"}, "invalid_app_version"),
        ({"app_version": "1234567"}, "invalid_app_version"),
        ({"app_version": "2.4.1-" + "x" * 64}, "invalid_app_version"),
        ({"app_version": "2.4.1-\u00e9"}, "invalid_app_version"),
        ({"platform": "i" * 33}, "invalid_platform"),
        ({"platform": "ios;drop"}, "invalid_platform"),
        ({"device_id": "d" * 129}, "invalid_device_id"),
        ({"device_id": "a b"}, "invalid_device_id"),
        ({"device_id": "é"}, "invalid_device_id"),
    ],
)
@pytest.mark.parametrize("path", [CHECK, CODE_PUSH])
def test_bad_device_fields_are_400_on_both_checks(
    client: httpx.Client, project: Project, params: dict[str, str], code: str, path: str
) -> None:
    release(client, project)
    response = client.get(path, params={"channel": "production", **params}, headers=project.key())
    assert_error(response, 400, code)


def test_a_128_character_device_id_and_a_uuid_are_fine(
    client: httpx.Client, project: Project
) -> None:
    bundle = release(client, project)
    assert offered(client, project, device_id="d" * 128) == bundle["version"]
    assert offered(client, project, device_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427") == 1


@pytest.mark.parametrize(
    ("method", "rest", "body"),
    [
        ("PATCH", "", {"platform": "ios"}),
        ("PATCH", "", {"rollout_percentage": 10}),
        ("POST", "/recall", None),
        ("POST", "/activate", {"rollout_percentage": 10}),
    ],
    ids=["patch-targeting", "patch-rollout", "recall", "activate-rollout"],
)
def test_another_projects_bundle_is_404_and_unchanged(
    server: RunningServer,
    client: httpx.Client,
    project: Project,
    method: str,
    rest: str,
    body: object,
) -> None:
    other = new_project(server.db, name="victim")
    bundle = release(client, other)
    listing = client.get(other.path("/bundles"), headers=other.auth).json()
    # Through the other project's path with our token, and through ours with its bundle id.
    for path in (
        other.path(f"/bundles/{bundle['id']}{rest}"),
        project.path(f"/bundles/{bundle['id']}{rest}"),
    ):
        response = client.request(method, path, headers=project.auth, json=body)
        assert response.status_code == 404, response.text
        assert_error(response, 404)
    assert client.get(other.path("/bundles"), headers=other.auth).json() == listing
    assert offered(client, other) == bundle["version"]


def test_recall_and_rollout_routes_404_for_an_unknown_bundle(
    client: httpx.Client, project: Project
) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    assert_error(recall(client, project, missing), 404, "bundle_not_found")
    assert_error(activate(client, project, missing, {"rollout_percentage": 5}), 404)
    assert_error(patch(client, project, missing, {"platform": "ios"}), 404, "bundle_not_found")
