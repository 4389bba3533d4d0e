"""List, activate, set mandatory and delete bundles over HTTP, and the crash-safety of delete."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from koolbase_ota.bundles.gc import collect_garbage
from koolbase_ota.bundles.models import PendingObject
from koolbase_ota.errors import StorageUnavailable
from koolbase_ota.storage import BundleStore, open_store
from koolbase_ota.storage.local import LocalStore
from tests.conftest import (
    Project,
    RunningServer,
    assert_download_refused,
    assert_error,
    make_zip,
    new_project,
    released,
    upload,
    uploaded,
)

Bundle = dict[str, Any]


def listed(client: httpx.Client, project: Project) -> list[Bundle]:
    response = client.get(project.path("/bundles"), headers=project.auth)
    assert response.status_code == 200, response.text
    body: list[Bundle] = response.json()
    return body


def by_id(client: httpx.Client, project: Project) -> dict[str, Bundle]:
    return {bundle["id"]: bundle for bundle in listed(client, project)}


def activate(client: httpx.Client, project: Project, bundle_id: str) -> httpx.Response:
    return client.post(project.path(f"/bundles/{bundle_id}/activate"), headers=project.auth)


def patch(
    client: httpx.Client, project: Project, bundle_id: str, content: bytes = b""
) -> httpx.Response:
    headers = {**project.auth, "Content-Type": "application/json"} if content else project.auth
    return client.patch(project.path(f"/bundles/{bundle_id}"), headers=headers, content=content)


def delete(client: httpx.Client, project: Project, bundle_id: str) -> httpx.Response:
    return client.delete(project.path(f"/bundles/{bundle_id}"), headers=project.auth)


def timestamp(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def download_url(client: httpx.Client, project: Project, channel: str = "production") -> str:
    response = client.get(
        "/v1/sdk/ota/check", params={"channel": channel, "version": 0}, headers=project.key()
    )
    assert response.status_code == 200, response.text
    url: str = response.json()["download_url"]
    return url


def pending_paths(server: RunningServer) -> dict[str, str]:
    with server.db.read() as session:
        return {row.storage_path: row.reason for row in session.scalars(select(PendingObject))}


def gc_store(server: RunningServer) -> BundleStore:
    """A store opened the way `koolbase-ota gc` opens it, apart from the running app."""
    return open_store(server.settings)


# List


def test_list_is_an_empty_array_for_a_project_without_bundles(
    client: httpx.Client, project: Project
) -> None:
    response = client.get(project.path("/bundles"), headers=project.auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == []


def test_list_orders_by_channel_then_version_descending(
    client: httpx.Client, project: Project
) -> None:
    for channel in ("staging", "production", "development", "staging", "production"):
        uploaded(client, project, channel=channel)
    order = [(bundle["channel"], bundle["version"]) for bundle in listed(client, project)]
    assert order == [
        ("development", 1),
        ("production", 2),
        ("production", 1),
        ("staging", 2),
        ("staging", 1),
    ]


def test_list_shows_the_same_object_as_the_upload(client: httpx.Client, project: Project) -> None:
    first = uploaded(client, project, release_notes="first")
    second = uploaded(client, project, channel="staging", mandatory="true")
    assert listed(client, project) == [first, second]


# Activate


def test_activate_answers_the_bundle_active_with_a_later_updated_at(
    client: httpx.Client, project: Project
) -> None:
    bundle = uploaded(client, project)
    response = activate(client, project, bundle["id"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["active"] is True
    assert timestamp(body["updated_at"]) > timestamp(bundle["updated_at"])
    assert bundle["released_at"] is None
    assert body["released_at"] == body["updated_at"]  # issue 6: the first activation releases it
    unchanged = {"active", "updated_at", "released_at"}
    assert {k: v for k, v in body.items() if k not in unchanged} == {
        k: v for k, v in bundle.items() if k not in unchanged
    }
    assert listed(client, project) == [body]


def test_activating_another_bundle_deactivates_the_first_and_no_other_channel(
    client: httpx.Client, project: Project
) -> None:
    staging = released(client, project, channel="staging")
    first = released(client, project)
    second = uploaded(client, project)

    body = activate(client, project, second["id"]).json()
    assert body["active"] is True

    after = by_id(client, project)
    assert after[first["id"]]["active"] is False
    assert timestamp(after[first["id"]]["updated_at"]) > timestamp(first["updated_at"])
    assert after[second["id"]]["active"] is True
    assert after[staging["id"]] == staging
    active = {bundle["id"] for bundle in after.values() if bundle["active"]}
    assert active == {staging["id"], second["id"]}


def test_activating_the_active_bundle_changes_nothing(
    client: httpx.Client, project: Project
) -> None:
    bundle = released(client, project)
    response = activate(client, project, bundle["id"])
    assert response.status_code == 200
    assert response.json() == bundle
    assert listed(client, project) == [bundle]


def test_concurrent_activations_leave_exactly_one_active_bundle(
    server: RunningServer, project: Project, client: httpx.Client
) -> None:
    bundles = [uploaded(client, project) for _ in range(8)]
    barrier = threading.Barrier(len(bundles))

    def race(bundle: Bundle) -> int:
        with httpx.Client(base_url=server.base_url, timeout=30) as own:
            barrier.wait()
            return activate(own, project, bundle["id"]).status_code

    with ThreadPoolExecutor(max_workers=len(bundles)) as pool:
        statuses = list(pool.map(race, bundles))

    assert statuses == [200] * len(bundles)
    active = [bundle for bundle in listed(client, project) if bundle["active"]]
    assert len(active) == 1


@pytest.mark.parametrize("bundle_id", ["9b2f6c1e-0d5a-4c43-9a8e-6f1d2b3c4d5e", "not-a-uuid", "1"])
@pytest.mark.parametrize("method", ["activate", "patch", "delete"])
def test_an_unknown_bundle_is_404(
    client: httpx.Client, project: Project, method: str, bundle_id: str
) -> None:
    uploaded(client, project)
    if method == "activate":
        response = activate(client, project, bundle_id)
    elif method == "patch":
        response = patch(client, project, bundle_id)
    else:
        response = delete(client, project, bundle_id)
    assert_error(response, 404, "bundle_not_found")


@pytest.mark.parametrize("method", ["activate", "patch", "delete"])
def test_a_bundle_of_another_project_is_404_and_left_alone(
    server: RunningServer, client: httpx.Client, project: Project, method: str
) -> None:
    other = new_project(server.db)
    theirs = uploaded(client, other)
    if method == "activate":
        response = activate(client, project, theirs["id"])
    elif method == "patch":
        response = patch(client, project, theirs["id"])
    else:
        response = delete(client, project, theirs["id"])
    assert_error(response, 404, "bundle_not_found")
    assert listed(client, other) == [theirs]
    assert server.object_exists(theirs["storage_path"])


# Mandatory


@pytest.mark.parametrize("value", [True, False])
def test_patch_sets_mandatory(client: httpx.Client, project: Project, value: bool) -> None:
    bundle = uploaded(client, project, mandatory=str(not value).lower())
    body = b'{"mandatory": true}' if value else b'{"mandatory": false}'
    response = patch(client, project, bundle["id"], body)
    assert response.status_code == 200, response.text
    changed = response.json()
    assert changed["mandatory"] is value
    assert timestamp(changed["updated_at"]) > timestamp(bundle["updated_at"])
    assert listed(client, project) == [changed]
    # Setting the value it already has keeps it.
    again = patch(client, project, bundle["id"], body)
    assert again.status_code == 200
    assert again.json()["mandatory"] is value


def test_an_empty_patch_body_toggles_mandatory(client: httpx.Client, project: Project) -> None:
    bundle = uploaded(client, project)
    assert bundle["mandatory"] is False
    first = patch(client, project, bundle["id"])
    assert first.status_code == 200, first.text
    assert first.json()["mandatory"] is True
    second = patch(client, project, bundle["id"])
    assert second.status_code == 200
    assert second.json()["mandatory"] is False
    assert timestamp(second.json()["updated_at"]) > timestamp(first.json()["updated_at"])
    assert listed(client, project)[0]["mandatory"] is False


@pytest.mark.parametrize(
    "content",
    [
        b"{",
        b"not json",
        b"[true]",
        b'"mandatory"',
        b"true",
        b'{"mandatory": "yes"}',
        b'{"mandatory": 1}',
        b'{"mandatory": "true"}',
        b'{"mandatory": true, "active": true}',
        b'{"active": true}',
    ],
)
def test_a_bad_patch_body_is_400_and_changes_nothing(
    client: httpx.Client, project: Project, content: bytes
) -> None:
    bundle = uploaded(client, project)
    assert_error(patch(client, project, bundle["id"], content), 400)
    assert listed(client, project) == [bundle]


# Delete


def test_delete_removes_the_row_the_file_and_handed_out_urls(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    kept = uploaded(client, project)
    bundle = released(client, project)
    url = download_url(client, project)
    assert httpx.get(url).status_code == 200
    assert server.object_exists(bundle["storage_path"])

    response = delete(client, project, bundle["id"])
    assert response.status_code == 204
    assert response.content == b""

    assert listed(client, project) == [kept]
    assert not server.object_exists(bundle["storage_path"])
    assert server.object_exists(kept["storage_path"])
    assert_download_refused(server, httpx.get(url), 404, local="bundle_not_found", s3="NoSuchKey")
    assert bundle["storage_path"] not in pending_paths(server)


def test_deleting_the_active_bundle_leaves_the_channel_without_one(
    client: httpx.Client, project: Project
) -> None:
    older = released(client, project)
    newest = released(client, project)
    staging = released(client, project, channel="staging")

    assert delete(client, project, newest["id"]).status_code == 204

    check = client.get("/v1/sdk/ota/check", params={"version": 0}, headers=project.key())
    assert check.status_code == 200
    assert check.json() == {"has_update": False}
    after = by_id(client, project)
    assert after[older["id"]]["active"] is False
    assert after[staging["id"]] == staging
    assert [bundle["id"] for bundle in after.values() if bundle["active"]] == [staging["id"]]


def test_deleting_twice_is_404(client: httpx.Client, project: Project) -> None:
    bundle = uploaded(client, project)
    assert delete(client, project, bundle["id"]).status_code == 204
    assert_error(delete(client, project, bundle["id"]), 404, "bundle_not_found")


def test_a_failed_store_delete_leaves_a_recorded_file_that_gc_removes(
    isolated: RunningServer,
    isolated_client: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The refused delete is injected: root ignores directory permissions, so local disk cannot
    # be made to refuse for real, and one injected fault keeps the test the same on S3.
    project = new_project(isolated.db)
    bundle = released(isolated_client, project)
    url = download_url(isolated_client, project)
    key = bundle["storage_path"]

    async def refuse(key: str) -> None:
        raise StorageUnavailable(f"could not delete {key}")

    monkeypatch.setattr(isolated.store, "delete", refuse)
    response = delete(isolated_client, project, bundle["id"])
    monkeypatch.undo()

    assert response.status_code == 204, response.text
    assert listed(isolated_client, project) == []
    assert isolated.object_exists(key)
    assert pending_paths(isolated) == {key: "delete"}
    if isolated.serves_downloads:
        # The file is still there, but the URL handed out before the delete no longer serves it.
        assert_error(httpx.get(url), 404, "bundle_not_found")
    else:
        # A presigned URL cannot be revoked: the store serves what it holds until gc runs.
        assert httpx.get(url).status_code == 200

    # A recorded delete is removed at once, whatever the grace period.
    report = asyncio.run(
        collect_garbage(db=isolated.db, store=gc_store(isolated), grace=dt.timedelta(hours=1))
    )
    assert report.removed == [key]
    assert report.missing == []
    assert report.failed == []
    assert not isolated.object_exists(key)
    assert isolated.stored_keys() == set()
    assert pending_paths(isolated) == {}
    assert_download_refused(isolated, httpx.get(url), 404, local="bundle_not_found", s3="NoSuchKey")


def test_gc_reports_a_row_whose_file_is_missing(
    isolated: RunningServer, isolated_client: httpx.Client
) -> None:
    project = new_project(isolated.db)
    gone = uploaded(isolated_client, project)
    kept = uploaded(isolated_client, project)
    asyncio.run(isolated.store.delete(gone["storage_path"]))

    report = asyncio.run(
        collect_garbage(db=isolated.db, store=gc_store(isolated), grace=dt.timedelta(0))
    )
    assert report.missing == [gone["storage_path"]]
    assert report.removed == []
    assert isolated.stored_keys() == {kept["storage_path"]}
    assert listed(isolated_client, project) == [kept, gone]


def test_gc_removes_a_copy_temporary_a_crash_left_behind(
    isolated: RunningServer, isolated_client: httpx.Client
) -> None:
    """A copy into place (bundle directory on another filesystem than the spool) writes a
    `.incoming-` file first; a crash in between left it, and gc never saw it."""
    if not isinstance(isolated.store, LocalStore):
        pytest.skip("the temporary is local disk's; S3 uploads leave no visible object")
    project = new_project(isolated.db)
    kept = uploaded(isolated_client, project)
    channel_dir = isolated.store.path_for(kept["storage_path"]).parent
    left = channel_dir / ".incoming-k2j4x9"
    left.write_bytes(b"half a bundle")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(left, (two_hours_ago, two_hours_ago))
    writing = channel_dir / ".incoming-p0q1r2"
    writing.write_bytes(b"a copy still being written")

    report = asyncio.run(
        collect_garbage(db=isolated.db, store=gc_store(isolated), grace=dt.timedelta(hours=1))
    )
    left_key = left.relative_to(isolated.store.root).as_posix()
    assert report.removed == [left_key]
    assert not left.exists()
    assert writing.exists()
    writing.unlink()
    assert isolated.stored_keys() == {kept["storage_path"]}
    assert listed(isolated_client, project) == [kept]


#: Per database dialect, the statements that make every insert into `bundles` fail, and undo it.
REFUSE_BUNDLE_INSERTS = {
    "sqlite": (
        [
            "CREATE TRIGGER refuse_bundles BEFORE INSERT ON bundles "
            "BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
        ],
        ["DROP TRIGGER refuse_bundles"],
    ),
    "postgresql": (
        [
            "CREATE FUNCTION refuse_bundle() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused by test'; END $$",
            "CREATE TRIGGER refuse_bundles BEFORE INSERT ON bundles "
            "FOR EACH ROW EXECUTE FUNCTION refuse_bundle()",
        ],
        ["DROP TRIGGER refuse_bundles ON bundles", "DROP FUNCTION refuse_bundle()"],
    ),
}


def test_an_upload_whose_row_cannot_be_written_leaves_no_file(
    isolated: RunningServer, isolated_client: httpx.Client
) -> None:
    project = new_project(isolated.db)
    # A real database failure at the last step: the insert of the bundle row is refused.
    create, drop = REFUSE_BUNDLE_INSERTS[isolated.db.engine.dialect.name]
    with isolated.db.engine.begin() as connection:
        for statement in create:
            connection.exec_driver_sql(statement)
    try:
        # A connection of its own: the server may close it after an unexpected error.
        with httpx.Client(base_url=isolated.base_url, timeout=30) as once:
            response = upload(once, project, make_zip({"a.json": "{}"}))
    finally:
        with isolated.db.engine.begin() as connection:
            for statement in drop:
                connection.exec_driver_sql(statement)

    assert response.status_code >= 500, response.text
    assert_error(response, response.status_code)
    assert isolated.stored_keys() == set()
    assert pending_paths(isolated) == {}
    assert listed(isolated_client, project) == []
    assert [p for p in (isolated.settings.data_dir / "tmp").rglob("*") if p.is_file()] == []
