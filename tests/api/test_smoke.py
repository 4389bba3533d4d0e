from __future__ import annotations

import httpx

from tests.conftest import Project, released


def test_check_offers_the_released_bundle(client: httpx.Client, project: Project) -> None:
    bundle = released(client, project)
    response = client.get("/v1/sdk/ota/check", params={"version": 0}, headers=project.key())
    assert response.status_code == 200
    assert response.json()["version"] == bundle["version"]
