"""Changes that race each other for real: gc while a promote stores its copy, a delete while
the same bundle is activated or its mandatory flag is set. Whatever the order, every answer is
the JSON one its order calls for, and no row is left without its file."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from koolbase_ota.bundles.gc import collect_garbage
from koolbase_ota.storage import StoredObject
from koolbase_ota.storage.local import LocalStore
from tests.api.test_bundles import gc_store, listed, pending_paths
from tests.conftest import (
    RunningServer,
    assert_error,
    eventually,
    new_project,
    uploaded,
)


def test_gc_leaves_alone_a_promoted_copy_stored_while_it_ran(
    isolated: RunningServer, isolated_client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = new_project(isolated.db)
    source = uploaded(isolated_client, project, channel="staging")
    if isinstance(isolated.store, LocalStore):
        # A bundle uploaded two hours ago: on local disk its promoted copy is a hard link of the
        # same file, so the copy looks two hours old too.
        two_hours_ago = time.time() - 2 * 3600
        os.utime(isolated.store.path_for(source["storage_path"]), (two_hours_ago, two_hours_ago))

    store = gc_store(isolated)
    list_keys = store.list_keys
    promoted: list[httpx.Response] = []

    async def promote_then_list(prefix: str) -> list[StoredObject]:
        # gc has read the database; the promote is stored and recorded before gc lists the store.
        promoted.append(
            isolated_client.post(
                project.path(f"/bundles/{source['id']}/promote"),
                headers=project.auth,
                json={"channel": "production", "activate": True},
            )
        )
        return await list_keys(prefix)

    monkeypatch.setattr(store, "list_keys", promote_then_list)
    report = asyncio.run(collect_garbage(db=isolated.db, store=store, grace=dt.timedelta(hours=1)))

    (response,) = promoted
    assert response.status_code == 201, response.text
    copy = response.json()
    assert report.removed == []
    assert report.missing == []
    assert isolated.object_exists(copy["storage_path"])
    assert isolated.stored_keys() == {source["storage_path"], copy["storage_path"]}
    # The copy is the channel's head, and devices can download it.
    check = isolated_client.get(
        "/v1/sdk/ota/check", params={"channel": "production", "version": 0}, headers=project.key()
    )
    assert check.status_code == 200, check.text
    assert httpx.get(check.json()["download_url"], timeout=30).status_code == 200


# A delete racing another change to the same bundle. On SQLite every write transaction takes
# the database's one write lock up front, so two changes never interleave; PostgreSQL runs them
# side by side, and a lock held by the test decides the order.


def _require_postgres(server: RunningServer) -> None:
    if server.db.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs write transactions one at a time; nothing interleaves")


def _waiting_for_locks(server: RunningServer) -> int:
    with server.db.read() as session:
        waiting: int = session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return waiting


def _send(server: RunningServer, method: str, path: str, **kwargs: object) -> httpx.Response:
    # A connection of its own per request: the server may close one after an unexpected error.
    with httpx.Client(base_url=server.base_url, timeout=30) as once:
        return once.request(method, path, **kwargs)  # type: ignore[arg-type]


def _settled(server: RunningServer, job: Future[httpx.Response], waiters: int) -> bool:
    """The request has answered, or waits on a lock (with `waiters` requests waiting in all)."""
    return job.done() or _waiting_for_locks(server) >= waiters


Request = tuple[str, str, dict[str, Any]]


def _queued_behind_a_lock(
    server: RunningServer, lock: str, params: dict[str, object], first: Request, second: Request
) -> tuple[httpx.Response, httpx.Response]:
    """`first`, then `second`, each sent once the one before waits on the lock that `lock`
    (a `SELECT ... FOR UPDATE`) holds; the lock is let go once both are queued or done."""
    with server.db.engine.connect() as holder, ThreadPoolExecutor(2) as pool:
        holder.execute(text(lock), params)

        def queue(request: Request, waiters: int) -> Future[httpx.Response]:
            method, path, kwargs = request
            job = pool.submit(_send, server, method, path, **kwargs)
            eventually(lambda: _settled(server, job, waiters), f"{method} queued", within=10)
            return job

        earlier = queue(first, 1)
        assert not earlier.done(), "the first request did not wait on the lock"
        later = queue(second, 2)
        holder.rollback()
        return earlier.result(timeout=30), later.result(timeout=30)


def test_activate_racing_a_delete_is_a_json_answer_and_leaves_no_row_without_its_file(
    isolated: RunningServer, isolated_client: httpx.Client
) -> None:
    _require_postgres(isolated)
    project = new_project(isolated.db)
    bundle = uploaded(isolated_client, project)
    path = project.path(f"/bundles/{bundle['id']}")
    # The channel's lock, which every change to a channel's bundles queues on.
    activated, deleted = _queued_behind_a_lock(
        isolated,
        "SELECT 1 FROM channels WHERE project_id = :project AND name = 'production' FOR UPDATE",
        {"project": project.id},
        ("POST", f"{path}/activate", {"headers": project.auth}),
        ("DELETE", path, {"headers": project.auth}),
    )

    assert deleted.status_code == 204, deleted.text
    if activated.status_code != 200:
        assert_error(activated, 404, "bundle_not_found")
    assert listed(isolated_client, project) == []
    assert isolated.stored_keys() == set()
    assert pending_paths(isolated) == {}


def test_setting_mandatory_racing_a_delete_is_a_json_answer(
    isolated: RunningServer, isolated_client: httpx.Client
) -> None:
    _require_postgres(isolated)
    project = new_project(isolated.db)
    bundle = uploaded(isolated_client, project)
    path = project.path(f"/bundles/{bundle['id']}")
    # The bundle's own row: the delete gets in line for it first, the PATCH second.
    deleted, patched = _queued_behind_a_lock(
        isolated,
        "SELECT 1 FROM bundles WHERE id = :id FOR UPDATE",
        {"id": bundle["id"]},
        ("DELETE", path, {"headers": project.auth}),
        ("PATCH", path, {"headers": project.auth, "json": {"mandatory": True}}),
    )

    assert deleted.status_code == 204, deleted.text
    assert_error(patched, 404, "bundle_not_found")
    assert listed(isolated_client, project) == []
    assert isolated.stored_keys() == set()
