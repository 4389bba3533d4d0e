"""Percentage rollouts (issue 6): set on activate, changed by PATCH, applied per bundle."""

from __future__ import annotations

import uuid

import httpx
import pytest

from koolbase_ota import audit
from koolbase_ota.bundles.targeting import in_rollout
from tests.api.release import activate, code_push, offered, patch, release, seed_check
from tests.conftest import Project, RunningServer, assert_error, uploaded

DEVICES = [str(uuid.UUID(int=n * 104729 + 7, version=4)) for n in range(300)]


def served(client: httpx.Client, project: Project, version: int) -> set[str]:
    """The devices among DEVICES that both checks offer `version` to."""
    return {d for d in DEVICES if offered(client, project, device_id=d) == version}


def test_activate_with_a_rollout_reaches_that_share_and_the_rest_get_the_previous_release(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    base = release(client, project)
    head = release(client, project, rollout=10)
    assert head["rollout_percentage"] == 10
    assert head["active"] is True
    in_head = served(client, project, head["version"])
    # Exactly the devices the documented hash puts in; a sample of 300 is about 10%.
    assert in_head == {d for d in DEVICES if in_rollout(d, head["id"], 10)}
    assert 10 <= len(in_head) <= 60
    assert served(client, project, base["version"]) == set(DEVICES) - in_head
    # No device id: only releases at 100%.
    assert offered(client, project) == base["version"]
    event = audit.list_events(server.db, project_id=project.id, limit=1)[0]
    assert (event.action, event.details["rollout_percentage"]) == (audit.BUNDLE_ACTIVATE, 10)


def test_raising_the_rollout_keeps_every_device_already_in(
    client: httpx.Client, project: Project
) -> None:
    release(client, project)
    head = release(client, project, rollout=10)
    at_10 = served(client, project, head["version"])
    response = patch(client, project, head["id"], {"rollout_percentage": 50})
    assert response.status_code == 200, response.text
    assert response.json()["rollout_percentage"] == 50
    at_50 = served(client, project, head["version"])
    assert at_10 <= at_50
    assert 90 <= len(at_50) <= 210
    # Activating the active bundle with a body sets its percentage too.
    assert activate(client, project, head["id"], {"rollout_percentage": 100}).status_code == 200
    assert served(client, project, head["version"]) == set(DEVICES)
    assert offered(client, project) == head["version"]


def test_each_release_keeps_its_own_percentage(client: httpx.Client, project: Project) -> None:
    first = release(client, project)
    second = release(client, project, rollout=50)
    third = release(client, project, rollout=20)
    for device in DEVICES[:60]:
        if in_rollout(device, third["id"], 20):
            expected = third["version"]
        elif in_rollout(device, second["id"], 50):
            expected = second["version"]
        else:
            expected = first["version"]
        assert offered(client, project, device_id=device) == expected


def test_a_device_outside_a_first_release_gets_nothing(
    client: httpx.Client, project: Project
) -> None:
    head = release(client, project, rollout=30)
    outside = next(d for d in DEVICES if not in_rollout(d, head["id"], 30))
    inside = next(d for d in DEVICES if in_rollout(d, head["id"], 30))
    assert seed_check(client, project, device_id=outside) == {"has_update": False}
    assert code_push(client, project, device_id=outside) == {"status": "no_update"}
    assert offered(client, project, device_id=inside) == head["version"]


def test_activate_without_a_body_answers_as_before(client: httpx.Client, project: Project) -> None:
    bundle = uploaded(client, project)
    bodies: tuple[dict[str, int] | None, ...] = (None, {})
    for body in bodies:
        response = activate(client, project, bundle["id"], body)
        assert response.status_code == 200, response.text
        assert response.json()["rollout_percentage"] == 100
    empty = client.post(
        project.path(f"/bundles/{bundle['id']}/activate"), headers=project.auth, content=b" "
    )
    assert empty.status_code == 200, empty.text


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"rollout_percentage": 0}, "invalid_rollout_percentage"),
        ({"rollout_percentage": 101}, "invalid_rollout_percentage"),
        ({"rollout_percentage": "x"}, "invalid_rollout_percentage"),
        ({"rollout_percentage": -5}, "invalid_rollout_percentage"),
        ({"rollout_percentage": 12.5}, "invalid_rollout_percentage"),
        ({"percentage": 10}, "invalid_body"),
        ([10], "invalid_body"),
    ],
)
def test_a_bad_rollout_on_activate_is_400_and_activates_nothing(
    client: httpx.Client, project: Project, body: object, code: str
) -> None:
    bundle = uploaded(client, project)
    assert_error(activate(client, project, bundle["id"], body), 400, code)
    listed = client.get(project.path("/bundles"), headers=project.auth).json()
    assert listed == [bundle]


def test_a_body_that_is_not_json_is_400(client: httpx.Client, project: Project) -> None:
    bundle = uploaded(client, project)
    response = client.post(
        project.path(f"/bundles/{bundle['id']}/activate"), headers=project.auth, content=b"{oops"
    )
    assert_error(response, 400, "invalid_json")
