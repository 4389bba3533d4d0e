"""Promote racing a recall of its source.

A recall is meant to stop a bundle's bytes from ever being served again, and promote refuses a
recalled source with 409 `bundle_recalled`. The recalled state was read once, before the copy;
a recall that committed after that read and before the copy's row was written was not seen, so
the copy of the recalled bytes was stored, and (with `"activate": true`) served as the new head.
The row is now written with the source's channel locked and the source read again.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio.to_thread
import httpx
import pytest
from sqlalchemy import select, text

from koolbase_ota.bundles.models import Bundle, PendingObject
from tests.conftest import (
    RunningServer,
    assert_error,
    eventually,
    new_project,
    released,
    uploaded,
)
from tests.test_integrity_races import _require_postgres, _waiting_for_locks

CHECK = "/v1/sdk/ota/check"


def _send(server: RunningServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=30) as once:
        return once.request(method, path, **kwargs)


def _rows(server: RunningServer, project_id: uuid.UUID) -> list[Bundle]:
    with server.db.read() as session:
        return list(session.scalars(select(Bundle).where(Bundle.project_id == project_id)))


def test_a_recall_landing_while_a_promote_copies_is_not_undone_by_the_copy(
    isolated: RunningServer, isolated_client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = new_project(isolated.db)
    good = released(isolated_client, project, channel="production")
    bad = uploaded(isolated_client, project, channel="staging")
    store = isolated.store
    real_copy = store.copy
    recalls: list[httpx.Response] = []

    async def recall_then_copy(source_key: str, target_key: str) -> None:
        # The promote has read its source (not recalled) and taken its version; an operator's
        # recall of that source lands now, through the API, before the copy is made.
        recalls.append(
            await anyio.to_thread.run_sync(
                lambda: _send(
                    isolated,
                    "POST",
                    project.path(f"/bundles/{bad['id']}/recall"),
                    headers=project.auth,
                )
            )
        )
        await real_copy(source_key, target_key)

    monkeypatch.setattr(store, "copy", recall_then_copy)
    response = isolated_client.post(
        project.path(f"/bundles/{bad['id']}/promote"),
        headers=project.auth,
        json={"channel": "production", "activate": True},
    )
    monkeypatch.undo()

    (recall,) = recalls
    assert recall.status_code == 200, recall.text
    assert recall.json()["recalled_at"] is not None
    # The recall committed before the copy's row: the promote must be refused as for any
    # recalled source, and nothing of the recalled bundle may be served on production.
    assert_error(response, 409, "bundle_recalled")
    assert [row.id for row in _rows(isolated, project.id) if row.promoted_from] == []
    # Nothing of the refused copy is left behind: no object, no record for gc.
    assert isolated.stored_keys() == {good["storage_path"], bad["storage_path"]}
    with isolated.db.read() as session:
        assert list(session.scalars(select(PendingObject.storage_path))) == []
    offered = isolated_client.get(
        CHECK, params={"channel": "production", "version": 0}, headers=project.key()
    )
    assert offered.status_code == 200, offered.text
    assert offered.json()["checksum"] == good["checksum"]
    assert offered.json()["version"] == good["version"]


def test_on_postgres_a_recall_while_the_promote_waits_for_its_target_channel_is_seen(
    isolated: RunningServer, isolated_client: httpx.Client
) -> None:
    """The same race with nothing patched: the target channel's row lock, held by the test
    (as any other change to production holds it), keeps the promote waiting after it read its
    source; the recall of the source (another channel's lock) goes through meanwhile."""
    _require_postgres(isolated)
    project = new_project(isolated.db)
    bad = uploaded(isolated_client, project, channel="staging")

    with isolated.db.engine.connect() as holder, ThreadPoolExecutor(1) as pool:
        holder.execute(
            text(
                "SELECT * FROM channels WHERE project_id = :project AND name = 'production' "
                "FOR UPDATE"
            ),
            {"project": project.id},
        )
        job = pool.submit(
            _send,
            isolated,
            "POST",
            project.path(f"/bundles/{bad['id']}/promote"),
            headers=project.auth,
            json={"channel": "production", "activate": True},
        )
        eventually(lambda: _waiting_for_locks(isolated) >= 1, "promote queued", within=10)
        assert not job.done()
        recall = isolated_client.post(
            project.path(f"/bundles/{bad['id']}/recall"), headers=project.auth
        )
        assert recall.status_code == 200, recall.text
        holder.rollback()
        response = job.result(timeout=30)

    assert_error(response, 409, "bundle_recalled")
    offered = isolated_client.get(
        CHECK, params={"channel": "production", "version": 0}, headers=project.key()
    )
    assert offered.status_code == 200, offered.text
    assert offered.json() == {"has_update": False}
