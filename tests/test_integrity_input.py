"""Text the form and the promote body may carry but the database cannot hold: refused with a
JSON 400 before anything is stored, on every backend (PostgreSQL text has no NUL character)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.test_bundles import listed, pending_paths
from tests.conftest import (
    RunningServer,
    assert_error,
    make_zip,
    new_project,
    upload,
    uploaded,
)


def fresh(server: RunningServer) -> httpx.Client:
    """A connection of its own per request: the server may close one after an unexpected error."""
    return httpx.Client(base_url=server.base_url, timeout=30)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"release_notes": "fixes\x00more"}, "invalid_release_notes"),
        ({"channel": "production\x00"}, "invalid_channel"),
        ({"channel": "Production"}, "invalid_channel"),
    ],
    ids=["nul-in-release-notes", "nul-in-channel", "channel-not-a-channel-name"],
)
def test_an_upload_with_text_the_database_cannot_hold_is_400_and_stores_nothing(
    isolated: RunningServer, fields: dict[str, str], code: str
) -> None:
    project = new_project(isolated.db)
    with fresh(isolated) as once:
        response = upload(once, project, make_zip(), **fields)
    assert_error(response, 400, code)
    with fresh(isolated) as client:
        assert listed(client, project) == []
        assert isolated.stored_keys() == set()
        assert pending_paths(isolated) == {}
        # No version was taken either: the refusal came before anything was allocated.
        assert uploaded(client, project)["version"] == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"channel": "staging", "release_notes": "fixes\x00more"}, "invalid_release_notes"),
        ({"channel": "staging\x00"}, "invalid_channel"),
    ],
    ids=["nul-in-release-notes", "nul-in-channel"],
)
def test_a_promote_with_text_the_database_cannot_hold_is_400_and_stores_nothing(
    isolated: RunningServer, isolated_client: httpx.Client, body: dict[str, Any], code: str
) -> None:
    project = new_project(isolated.db)
    source = uploaded(isolated_client, project)
    with fresh(isolated) as once:
        response = once.post(
            project.path(f"/bundles/{source['id']}/promote"), headers=project.auth, json=body
        )
    assert_error(response, 400, code)
    assert listed(isolated_client, project) == [source]
    assert isolated.stored_keys() == {source["storage_path"]}
    assert pending_paths(isolated) == {}
