"""Recall (issue 6): a recalled bundle is never served again and its devices are sent back."""

from __future__ import annotations

import httpx

from koolbase_ota import audit
from tests.api.release import (
    activate,
    code_push,
    offered,
    recall,
    release,
    seed_check,
)
from tests.conftest import OFFER_FIELDS, Project, RunningServer, assert_error, uploaded


def recalled(client: httpx.Client, project: Project, bundle_id: str) -> dict[str, object]:
    response = recall(client, project, bundle_id)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def listing(client: httpx.Client, project: Project) -> dict[int, dict[str, object]]:
    bundles = client.get(project.path("/bundles"), headers=project.auth).json()
    return {bundle["version"]: bundle for bundle in bundles}


def test_recalling_the_head_makes_the_previous_release_the_head(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    first = release(client, project, release_notes="good")
    second = release(client, project, release_notes="bad")
    body = recalled(client, project, second["id"])
    assert body["recalled_at"] is not None
    assert body["active"] is False
    bundles = listing(client, project)
    assert bundles[first["version"]]["active"] is True
    # A new device gets the previous release; a device on it stays.
    assert offered(client, project) == first["version"]
    assert offered(client, project, current_bundle=first["version"]) == 0
    event = audit.list_events(server.db, project_id=project.id, limit=1)[0]
    assert event.action == audit.BUNDLE_RECALL
    assert event.target == second["id"]
    assert event.details["new_head"] == first["id"]


def test_a_device_on_a_recalled_version_is_sent_back_to_the_older_release(
    client: httpx.Client, project: Project
) -> None:
    first = release(client, project, release_notes="good", mandatory="true")
    second = release(client, project, release_notes="bad")
    recalled(client, project, second["id"])
    seed = seed_check(client, project, version=second["version"])
    # The older release's usual fields, plus the additive `rollback`.
    assert set(seed) == OFFER_FIELDS | {"rollback"}
    assert seed["rollback"] is True
    assert seed["has_update"] is True
    assert (seed["version"], seed["checksum"]) == (first["version"], first["checksum"])
    assert (seed["release_notes"], seed["mandatory"]) == ("good", True)
    download = httpx.get(seed["download_url"], timeout=30)
    assert download.status_code == 200
    push = code_push(client, project, current_bundle=second["version"])
    assert push == {"status": "rollback", "revert_to": first["version"]}


def test_a_device_on_the_only_recalled_release_goes_back_to_built_in(
    client: httpx.Client, project: Project
) -> None:
    only = release(client, project)
    recalled(client, project, only["id"])
    assert listing(client, project)[only["version"]]["active"] is False
    assert code_push(client, project, current_bundle=only["version"]) == {
        "status": "rollback",
        "revert_to": 0,
    }
    # The seed SDK cannot drop a bundle: the least harmful answer is "no update".
    assert seed_check(client, project, version=only["version"]) == {"has_update": False}
    # Devices without the bundle are offered nothing.
    assert offered(client, project) == 0


def test_recall_walks_back_past_other_recalled_and_non_matching_releases(
    client: httpx.Client, project: Project
) -> None:
    first = release(client, project)
    second = release(client, project, platform="android")
    third = release(client, project)
    fourth = release(client, project, platform="ios")
    recalled(client, project, third["id"])
    recalled(client, project, fourth["id"])
    # The head is now the second; an iOS device on the fourth goes back past it and the third.
    assert code_push(client, project, current_bundle=fourth["version"], platform="ios") == {
        "status": "rollback",
        "revert_to": first["version"],
    }
    seed = seed_check(client, project, version=fourth["version"], platform="ios")
    assert (seed["version"], seed["rollback"]) == (first["version"], True)
    # An Android device on the third goes back to the second.
    push = code_push(client, project, current_bundle=third["version"], platform="android")
    assert push == {"status": "rollback", "revert_to": second["version"]}
    # New devices never get a recalled bundle.
    assert offered(client, project, platform="ios") == first["version"]
    assert offered(client, project, platform="android") == second["version"]


def test_a_recalled_bundle_below_the_head_is_skipped_and_its_devices_move_on(
    client: httpx.Client, project: Project
) -> None:
    first = release(client, project)
    second = release(client, project)
    third = release(client, project, rollout=1)
    recalled(client, project, second["id"])
    assert listing(client, project)[third["version"]]["active"] is True
    outside = next(
        f"device-{n}"
        for n in range(1000)
        if offered(client, project, device_id=f"device-{n}") != third["version"]
    )
    # Out of the head's rollout: the walk skips the recalled second and lands on the first.
    assert offered(client, project, device_id=outside) == first["version"]
    push = code_push(client, project, current_bundle=second["version"], device_id=outside)
    assert push == {"status": "rollback", "revert_to": first["version"]}
    # A device on the recalled second that is in the head's rollout simply updates.
    inside = next(
        f"device-{n}"
        for n in range(5000)
        if offered(client, project, device_id=f"device-{n}") == third["version"]
    )
    push = code_push(client, project, current_bundle=second["version"], device_id=inside)
    assert push["status"] == "update_available"
    assert push["bundle"]["version"] == third["version"]


def test_recall_is_idempotent_and_a_recalled_bundle_cannot_be_activated(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    bundle = release(client, project)
    once = recalled(client, project, bundle["id"])
    twice = recalled(client, project, bundle["id"])
    assert once == twice
    recalls = [
        event
        for event in audit.list_events(server.db, project_id=project.id)
        if event.action == audit.BUNDLE_RECALL
    ]
    assert len(recalls) == 1
    assert_error(activate(client, project, bundle["id"]), 409, "bundle_recalled")
    assert_error(
        activate(client, project, bundle["id"], {"rollout_percentage": 50}), 409, "bundle_recalled"
    )
    assert offered(client, project) == 0


def test_recalling_a_bundle_never_released_keeps_the_head(
    client: httpx.Client, project: Project
) -> None:
    head = release(client, project)
    draft = uploaded(client, project)
    body = recalled(client, project, draft["id"])
    assert body["released_at"] is None
    assert listing(client, project)[head["version"]]["active"] is True
    assert offered(client, project) == head["version"]


def test_a_recalled_mandatory_release_forces_nothing(
    client: httpx.Client, project: Project
) -> None:
    release(client, project)
    bad = release(client, project, mandatory="true")
    fixed = release(client, project)
    assert seed_check(client, project, version=1)["mandatory"] is True
    recalled(client, project, bad["id"])
    assert seed_check(client, project, version=1)["mandatory"] is False
    push = code_push(client, project, current_bundle=1)
    assert (push["bundle"]["version"], push["bundle"]["mandatory"]) == (fixed["version"], False)


def test_a_channel_whose_head_was_deleted_still_sends_recalled_devices_back(
    client: httpx.Client, project: Project
) -> None:
    """Deleting the head leaves the channel offering nothing; a device on a recalled version
    was told to drop to the built-in assets, although an older release is still there."""
    first = release(client, project, release_notes="good")
    second = release(client, project, platform="android")
    third = release(client, project)
    fourth = release(client, project, release_notes="bad")
    recalled(client, project, fourth["id"])  # the third is the head now
    deleted = client.delete(project.path(f"/bundles/{third['id']}"), headers=project.auth)
    assert deleted.status_code == 204, deleted.text
    assert not any(bundle["active"] for bundle in listing(client, project).values())

    for platform, back_to in (("ios", first), ("android", second)):
        push = code_push(client, project, current_bundle=fourth["version"], platform=platform)
        assert push == {"status": "rollback", "revert_to": back_to["version"]}
        seed = seed_check(client, project, version=fourth["version"], platform=platform)
        assert (seed["version"], seed["rollback"]) == (back_to["version"], True)
        assert httpx.get(seed["download_url"], timeout=30).status_code == 200
    # Every other device is offered nothing: the channel has no head.
    for version in (0, first["version"], second["version"], third["version"]):
        assert offered(client, project, current_bundle=version) == 0
        assert seed_check(client, project, version=version) == {"has_update": False}
    # With no older release left either, it is the built-in assets, as before.
    for bundle in (first, second):
        response = client.delete(project.path(f"/bundles/{bundle['id']}"), headers=project.auth)
        assert response.status_code == 204, response.text
    push = code_push(client, project, current_bundle=fourth["version"])
    assert push == {"status": "rollback", "revert_to": 0}
