"""Helpers shared by the release-history tests (issue 6): both checks, activate, recall, PATCH."""

from __future__ import annotations

from typing import Any

import httpx

from koolbase_ota.projects import channels
from tests.conftest import Project, RunningServer, uploaded

CHECK = "/v1/sdk/ota/check"
CODE_PUSH = "/v1/code-push/check"


def seed_check(client: httpx.Client, project: Project, **params: str | int) -> dict[str, Any]:
    """A seed check that must answer 200."""
    response = client.get(CHECK, params=params, headers=project.key())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def code_push(client: httpx.Client, project: Project, **params: str | int) -> dict[str, Any]:
    """A code-push check (on `production` unless told) that must answer 200."""
    params.setdefault("channel", "production")
    response = client.get(CODE_PUSH, params=params, headers=project.key())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def offered(client: httpx.Client, project: Project, **params: str | int) -> int:
    """The version both checks offer a device (0: none), asserting they agree."""
    seed_params = dict(params)
    current = seed_params.pop("current_bundle", 0)
    seed = seed_check(client, project, version=current, **seed_params)
    push = code_push(client, project, **{**seed_params, "current_bundle": current})
    if not seed["has_update"]:
        assert push == {"status": "no_update"}, (seed, push)
        return 0
    assert push["status"] == "update_available", (seed, push)
    assert push["bundle"]["version"] == seed["version"]
    assert push["bundle"]["checksum"] == seed["checksum"]
    assert "rollback" not in seed
    version: int = seed["version"]
    return version


def activate(
    client: httpx.Client, project: Project, bundle_id: str, body: Any = None
) -> httpx.Response:
    path = project.path(f"/bundles/{bundle_id}/activate")
    if body is None:
        return client.post(path, headers=project.auth)
    return client.post(path, headers=project.auth, json=body)


def release(
    client: httpx.Client, project: Project, rollout: int | None = None, **fields: str
) -> dict[str, Any]:
    """Upload and activate a bundle, at `rollout` percent when given."""
    bundle = uploaded(client, project, **fields)
    response = activate(
        client, project, bundle["id"], None if rollout is None else {"rollout_percentage": rollout}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def patch(client: httpx.Client, project: Project, bundle_id: str, body: Any) -> httpx.Response:
    return client.patch(project.path(f"/bundles/{bundle_id}"), headers=project.auth, json=body)


def recall(client: httpx.Client, project: Project, bundle_id: str) -> httpx.Response:
    return client.post(project.path(f"/bundles/{bundle_id}/recall"), headers=project.auth)


def add_stable(server: RunningServer, project: Project) -> None:
    """The code-push SDKs' default channel, added to the project as a custom channel."""
    channels.add_channel(server.db, project_id=project.id, name="stable")
