"""A COMMIT whose answer is lost: the database wrote the new bundle's row, but the server hears
an error (the connection dropped before the answer came). The stored file must stay with its
row, never be removed as if the row had not been written."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from koolbase_ota.bundles.models import Bundle
from tests.api.test_bundles import listed, pending_paths
from tests.conftest import RunningServer, make_zip, new_project, upload, uploaded


@pytest.fixture
def lose_the_answer_to_the_next_bundle_commit() -> Iterator[None]:
    """Injected: a connection cannot be made to drop between PostgreSQL's commit and its
    answer on cue. The commit happens; then the error a dropped connection raises."""
    armed = [True]

    def noted(session: Session, instance: object) -> None:
        if isinstance(instance, Bundle):
            session.info["new_bundle"] = True

    def lost(session: Session) -> None:
        if session.info.pop("new_bundle", False) and armed[0]:
            armed[0] = False
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    event.listen(Session, "pending_to_persistent", noted)
    event.listen(Session, "after_commit", lost)
    try:
        yield
    finally:
        event.remove(Session, "after_commit", lost)
        event.remove(Session, "pending_to_persistent", noted)


@pytest.mark.usefixtures("lose_the_answer_to_the_next_bundle_commit")
def test_an_upload_whose_commit_answer_is_lost_keeps_its_file(
    isolated: RunningServer, isolated_client: httpx.Client
) -> None:
    project = new_project(isolated.db)
    sent = make_zip()  # once: a zip made later may carry another timestamp
    response = upload(isolated_client, project, sent)

    # The row is there: the upload did happen, and says so.
    assert response.status_code == 201, response.text
    bundle = response.json()
    assert listed(isolated_client, project) == [bundle]
    assert isolated.stored_keys() == {bundle["storage_path"]}
    assert isolated.read_object(bundle["storage_path"]) == sent
    assert pending_paths(isolated) == {}


def test_a_promote_whose_commit_answer_is_lost_keeps_its_file(
    isolated: RunningServer, isolated_client: httpx.Client, request: pytest.FixtureRequest
) -> None:
    project = new_project(isolated.db)
    source = uploaded(isolated_client, project, channel="staging")
    request.getfixturevalue("lose_the_answer_to_the_next_bundle_commit")
    response = isolated_client.post(
        project.path(f"/bundles/{source['id']}/promote"),
        headers=project.auth,
        json={"channel": "production", "activate": True},
    )

    assert response.status_code == 201, response.text
    copy = response.json()
    assert copy["active"] is True
    assert isolated.stored_keys() == {source["storage_path"], copy["storage_path"]}
    assert pending_paths(isolated) == {}
    # The active copy is downloadable, as every device is about to ask.
    check = isolated_client.get(
        "/v1/sdk/ota/check", params={"channel": "production", "version": 0}, headers=project.key()
    )
    assert check.status_code == 200, check.text
    assert httpx.get(check.json()["download_url"], timeout=30).status_code == 200
