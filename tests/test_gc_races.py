"""`koolbase-ota gc` while the servers keep working.

gc runs beside live servers (the README has it in cron). A bundle deleted through the API while
gc runs must neither be reported as a row whose file is missing (no such row exists any more,
and the report exits non-zero, "something needs a look"), nor stop gc with an exception.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pathlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

import koolbase_ota.bundles.gc as gc_module
import koolbase_ota.db as db_module
from koolbase_ota.bundles.gc import collect_garbage
from koolbase_ota.bundles.models import PendingObject
from koolbase_ota.db import Database, create_db_engine, upgrade_schema, utcnow
from koolbase_ota.storage import open_store
from koolbase_ota.storage.local import LocalStore
from tests.conftest import RunningServer, new_project, uploaded
from tests.services import PostgresService


def test_a_bundle_deleted_while_gc_checks_the_rows_is_not_reported_missing(
    isolated: RunningServer, isolated_client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = new_project(isolated.db)
    first = uploaded(isolated_client, project)
    second = uploaded(isolated_client, project)
    store = open_store(isolated.settings)  # as `koolbase-ota gc` opens it
    real_exists = store.exists
    deleted: list[int] = []

    async def delete_then_look(key: str) -> bool:
        # gc has read the rows again and now looks for each row's file; meanwhile a dashboard
        # user deletes the second bundle (row first, then its file), as any server may.
        if not deleted:
            response = isolated_client.delete(
                project.path(f"/bundles/{second['id']}"), headers=project.auth
            )
            deleted.append(response.status_code)
        return await real_exists(key)

    monkeypatch.setattr(store, "exists", delete_then_look)
    report = asyncio.run(collect_garbage(db=isolated.db, store=store, grace=dt.timedelta(hours=1)))

    assert deleted == [204]
    assert isolated.object_exists(first["storage_path"])
    # No bundle row is without its file: the second bundle's row went before its file did.
    assert report.missing == [], report
    assert report.failed == []


def test_a_file_deleted_while_gc_lists_local_disk_does_not_stop_gc(
    isolated: RunningServer, isolated_client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`LocalStore.list_keys` asks `is_file()`, then `stat()`, of every file: a bundle deleted
    between the two (a window of microseconds, so the delete is made to land there) raised
    FileNotFoundError out of gc, which `koolbase-ota gc` shows as a traceback."""
    if not isinstance(isolated.store, LocalStore):
        pytest.skip("the listing of local disk")
    project = new_project(isolated.db)
    kept = uploaded(isolated_client, project)
    doomed = uploaded(isolated_client, project)
    store = open_store(isolated.settings)
    assert isinstance(store, LocalStore)
    doomed_file = store.path_for(doomed["storage_path"])
    real_stat = pathlib.Path.stat
    landed: list[Path] = []

    def stat_then_delete(self: pathlib.Path, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_stat(self, *args, **kwargs)
        if self == doomed_file and not landed:
            # The server's delete of this bundle lands right after gc's `is_file()`.
            landed.append(self)
            response = isolated_client.delete(
                project.path(f"/bundles/{doomed['id']}"), headers=project.auth
            )
            assert response.status_code == 204, response.text
        return result

    monkeypatch.setattr(pathlib.Path, "stat", stat_then_delete)
    try:
        report = asyncio.run(
            collect_garbage(db=isolated.db, store=store, grace=dt.timedelta(hours=1))
        )
    finally:
        monkeypatch.undo()

    assert landed == [doomed_file]
    assert not doomed_file.exists()
    assert report.missing == []
    assert report.failed == []
    assert isolated.stored_keys() == {kept["storage_path"]}


def test_gc_clears_more_records_than_one_postgres_statement_can_name(
    postgres: PostgresService, tmp_path: Path
) -> None:
    """gc forgets every record it settled with one `DELETE ... WHERE storage_path IN (...)`,
    one bind parameter a path; PostgreSQL's protocol takes at most 65535. Past that, every run
    removes the files and then fails ("the database is unavailable"), and the records stay, so
    the next run fails the same way. Records pile up so when the store refuses deletes (a key
    without delete rights): each bundle delete leaves one; or a restored database leaves as many
    unknown files."""
    engine = create_db_engine(postgres.create_database())
    upgrade_schema(engine, lock_dir=tmp_path)
    db = Database(engine)
    try:
        with db.write() as session:
            # In one statement: 70,000 rows added through the ORM took half the test's time.
            session.execute(
                text(
                    "INSERT INTO pending_objects (storage_path, reason, created_at)"
                    " SELECT 'ota/' || :project || '/production/v' || n || '.zip', 'delete',"
                    " :day_ago FROM generate_series(1, 70000) AS n"
                ),
                {"project": str(uuid.UUID(int=1)), "day_ago": utcnow() - dt.timedelta(days=1)},
            )
        # The store these deletes were meant for (the files are gone already: deleting a
        # missing file is no error), on local disk so the run takes seconds.
        store = LocalStore(tmp_path / "bundles", public_url="http://127.0.0.1", secret_key="k" * 32)

        try:
            report = asyncio.run(collect_garbage(db=db, store=store))
        except OperationalError as exc:  # the statement itself is 70,000 lines: not shown
            pytest.fail(f"gc failed after removing the files: {exc.orig}")

        assert len(report.removed) == 70_000
        assert report.failed == []
        with db.read() as session:
            assert session.scalar(select(func.count()).select_from(PendingObject)) == 0
    finally:
        engine.dispose()


def test_an_upload_in_flight_is_aged_by_the_database_clock_not_gcs(
    server_factory: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc run from a host whose clock is two hours ahead (a laptop, a cron box without NTP):
    an upload whose object is stored and whose row is not yet written must stay. Its record
    was aged by gc's clock, and the object removed. The skew is the one thing faked here."""
    server = server_factory()
    if server.backend != "postgres-s3":
        pytest.skip("a SQLite file is only used on its own host: one clock")
    project = new_project(server.db)
    # An upload between storing its object and writing its row: its record, and its object.
    key = f"ota/{project.id}/production/v1.zip"
    with server.db.write() as session:
        session.add(PendingObject(storage_path=key, reason="upload", created_at=utcnow()))
    store = open_store(server.settings)
    source = server.settings.data_dir / "in-flight.zip"
    source.write_bytes(b"an upload in flight")
    asyncio.run(store.put_file(key, source))

    ahead = dt.timedelta(hours=2)
    monkeypatch.setattr(gc_module, "utcnow", lambda: utcnow() + ahead)
    monkeypatch.setattr(db_module, "utcnow", lambda: utcnow() + ahead)
    report = asyncio.run(collect_garbage(db=server.db, store=store, grace=dt.timedelta(hours=1)))

    assert report.removed == []
    assert server.object_exists(key)
    with server.db.read() as session:
        assert session.scalar(select(func.count()).select_from(PendingObject)) == 1
