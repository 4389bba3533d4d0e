"""`koolbase-ota move`: carry an embedded install (SQLite + local disk) to PostgreSQL + S3.

Every id, version, key hash, token hash and checksum is copied as it is, so devices in the
field and scripts holding tokens notice nothing once the servers point at the new backends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from sqlalchemy import Table, func, insert, select

import koolbase_ota.audit
import koolbase_ota.bundles.models
import koolbase_ota.projects.models  # noqa: F401  (registers every table on the metadata)
from koolbase_ota.bundles.models import Bundle, PendingObject
from koolbase_ota.changes import ChangeEvent
from koolbase_ota.db import Base, Database
from koolbase_ota.errors import InvalidInput
from koolbase_ota.projects.models import Project
from koolbase_ota.storage import BundleStore, ObjectExists, ObjectNotFound
from koolbase_ota.storage.local import LocalStore

logger = logging.getLogger(__name__)
_BATCH = 500


@dataclass
class MoveReport:
    rows: dict[str, int] = field(default_factory=dict)
    objects_copied: int = 0
    objects_already_there: int = 0
    #: Objects read back from the target store and found to match their bundle's checksum.
    objects_verified: int = 0


class MoveError(InvalidInput):
    default_code = "move_refused"


Rows = dict[str, list[dict[str, Any]]]


def _copied_tables() -> list[Table]:
    """Every table, parents before children, but those that only make sense where they are:
    pending objects belong to the old store, change events to the old processes' caches."""
    skipped = {PendingObject.__tablename__, ChangeEvent.__tablename__}
    return [table for table in Base.metadata.sorted_tables if table.name not in skipped]


def _read_rows(db: Database, tables: list[Table]) -> Rows:
    """Every row of `tables`, in primary key order, from one snapshot of the database."""
    with db.read() as session:
        return {
            table.name: [
                dict(row)
                for row in session.execute(
                    select(table).order_by(*table.primary_key.columns)
                ).mappings()
            ]
            for table in tables
        }


async def move_install(
    *,
    source_db: Database,
    source_store: BundleStore,
    target_db: Database,
    target_store: BundleStore,
    jobs: int,
) -> MoveReport:
    """Copy every bundle file, then every row in one transaction; refuse a non-empty target.

    Files and rows come from one snapshot of the source, and the source is read again before
    the rows are committed: a change made meanwhile (a server still running on it) would
    otherwise be lost, or leave a row whose file was never copied. Every file is read back
    from the target store and checked against its checksum before any row is written.
    """
    if not isinstance(source_store, LocalStore):
        raise MoveError("the source must be the embedded default's local bundle directory")

    def target_is_empty() -> bool:
        with target_db.read() as session:
            return session.scalar(select(func.count()).select_from(Project)) == 0

    if not await anyio.to_thread.run_sync(target_is_empty):
        raise MoveError("the target database already holds projects; move into an empty one")

    tables = _copied_tables()
    snapshot = await anyio.to_thread.run_sync(_read_rows, source_db, tables)
    if not snapshot[Project.__tablename__]:
        # Most likely KOOLBASE_OTA_DATA_DIR or KOOLBASE_OTA_DATABASE_URL names the wrong place.
        raise MoveError("the source database holds no project: there is nothing to move")

    report = MoveReport()
    # 1. Files first: a row is never written without its file already in the target store.
    # `jobs` at a time (each a round trip or two to the store: one after another, a large
    # install kept every server stopped for hours); after a failure no other one starts, and
    # those under way finish, so a rerun finds them whole.
    pending = iter(sorted(snapshot[Bundle.__tablename__], key=lambda row: row["storage_path"]))
    failures: list[Exception] = []

    async def copy_files() -> None:
        for bundle in pending:
            if failures:
                return
            try:
                await _copy_file(bundle, source_store, target_store, report)
            except Exception as exc:  # raised once every copy under way has finished
                failures.append(exc)
                return

    async with anyio.create_task_group() as group:
        for _ in range(jobs):
            group.start_soon(copy_files)
    if failures:
        raise failures[0]

    # 2. Rows, parents before children, in one transaction: all of them or none.
    def copy_rows() -> None:
        with target_db.write() as target:
            for table in tables:
                rows = snapshot[table.name]
                for start in range(0, len(rows), _BATCH):
                    target.execute(insert(table), rows[start : start + _BATCH])
                report.rows[table.name] = len(rows)
            if _read_rows(source_db, tables) != snapshot:
                raise MoveError(
                    "the source changed during the move, so nothing was written to the target"
                    " database; stop every server using the source, then run move again"
                )

    await anyio.to_thread.run_sync(copy_rows)
    return report


async def _copy_file(
    bundle: dict[str, Any],
    source_store: LocalStore,
    target_store: BundleStore,
    report: MoveReport,
) -> None:
    """Copy one bundle's file to the target store (unless there) and read it back."""
    storage_path = bundle["storage_path"]
    what = f"bundle {bundle['id']} ({bundle['channel']} v{bundle['version']})"
    try:
        checksum = await source_store.checksum(storage_path)
    except ObjectNotFound:
        raise MoveError(
            f"{what}: its file {storage_path} is missing from the source; restore the file"
            " or delete the bundle, then run move again"
        ) from None
    if checksum != bundle["checksum"]:
        raise MoveError(
            f"{what}: its file {storage_path} does not match its checksum; restore the"
            " file or delete the bundle, then run move again"
        )
    try:
        await target_store.put_file(storage_path, source_store.path_for(storage_path))
        report.objects_copied += 1
        found = "copied to"
    except ObjectExists:
        # Most likely a move that was interrupted and run again; but another install
        # sharing the bucket prefix, or something else writing there, leaves an object
        # too, and devices would download whatever it holds: none is trusted unread.
        report.objects_already_there += 1
        found = "already at"
    await _check_stored(
        target_store, storage_path, bundle["checksum"], f"{what}: the object {found}"
    )
    report.objects_verified += 1


async def _check_stored(store: BundleStore, key: str, checksum: str, what: str) -> None:
    """Read the object at `key` back from the target store; refuse it unless it matches."""
    try:
        stored = await store.checksum(key)
    except ObjectNotFound:
        # Gone right after being written or found: something else manages that prefix.
        raise MoveError(
            f"{what} {key} is no longer in the target store, so no row was written; make sure"
            " no other install uses that --storage-url, then run move again"
        ) from None
    if stored != checksum:
        raise MoveError(
            f"{what} {key} in the target store does not match the bundle's checksum, so no"
            " row was written; if no other install uses that --storage-url, remove the object"
            " at that key from the target store, otherwise point --storage-url at an empty"
            " prefix, then run move again"
        )
