"""`koolbase-ota gc`: remove stored files no bundle row refers to, report rows missing files."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread
from sqlalchemy import delete, select

from koolbase_ota.bundles.models import Bundle, PendingObject
from koolbase_ota.db import Database, database_now, utcnow
from koolbase_ota.storage import BundleStore
from koolbase_ota.storage.local import LocalStore

logger = logging.getLogger(__name__)


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def collect_garbage(
    *,
    db: Database,
    store: BundleStore,
    grace: dt.timedelta = dt.timedelta(hours=1),
    tmp_dir: Path | None = None,
) -> GcReport:
    """Remove recorded and unreferenced files; list rows whose file is gone.

    Files younger than `grace` are left alone: they may belong to an upload still in flight.
    With `tmp_dir` (the data dir's `tmp`), staged uploads left there by a server that died
    mid-upload are removed too, and listed in `removed` by their full path.

    Ages are told by the clock that wrote each time, not by this host's: an upload's record by
    the database's (`database_now`), an object in S3 by the store's, which the database's
    stands in for; local files by this host's, the only one that writes them.
    """
    report = GcReport()
    if tmp_dir is not None:
        report.removed += await anyio.to_thread.run_sync(
            _remove_stale_uploads, tmp_dir, utcnow() - grace
        )

    def snapshot() -> tuple[set[str], list[PendingObject], dt.datetime]:
        with db.read() as session:
            paths = set(session.scalars(select(Bundle.storage_path)))
            pending = list(session.scalars(select(PendingObject)))
            now = database_now(session)
        return paths, pending, now

    referenced, pending, now = await anyio.to_thread.run_sync(snapshot)
    cutoff = now - grace
    candidates = {
        record.storage_path
        for record in pending
        if record.reason == "delete" or record.created_at < cutoff
    }
    object_cutoff = utcnow() - grace if isinstance(store, LocalStore) else cutoff
    for stored in await store.list_keys("ota/"):
        if stored.key not in referenced and stored.modified_at < object_cutoff:
            candidates.add(stored.key)
    # Read again once the store is listed: an upload or promote records its key before it
    # stores the object, so any object listed above that is in flight or finished meanwhile
    # shows here. Its age is no guide: a promoted copy on local disk is a hard link with its
    # source's modification time.
    referenced, pending, _now = await anyio.to_thread.run_sync(snapshot)
    recent_pending = {
        record.storage_path
        for record in pending
        if record.reason != "delete" and record.created_at >= cutoff
    }
    candidates -= referenced | recent_pending

    for path in sorted(candidates):
        try:
            await store.delete(path)
        except Exception as exc:
            logger.warning("could not remove %s: %s", path, exc)
            report.failed.append(path)
            continue
        report.removed.append(path)

    def forget(paths: list[str]) -> None:
        # In batches: one statement names each path, and PostgreSQL takes at most 65,535
        # parameters a statement (a backlog past that failed every run, keeping its records).
        with db.write() as session:
            for start in range(0, len(paths), _BATCH):
                batch = paths[start : start + _BATCH]
                session.execute(delete(PendingObject).where(PendingObject.storage_path.in_(batch)))

    done = list(report.removed) + sorted(
        record.storage_path for record in pending if record.storage_path in referenced
    )
    if done:
        await anyio.to_thread.run_sync(forget, done)
    gone = [path for path in sorted(referenced) if not await store.exists(path)]
    if gone:
        # A delete removes its row before its file: a bundle deleted since the rows were read
        # has neither now, and is not missing anything.
        report.missing = await anyio.to_thread.run_sync(_still_referenced, db, gone)
    return report


#: Paths named in one statement.
_BATCH = 1000


def _still_referenced(db: Database, paths: list[str]) -> list[str]:
    """Those of `paths` that a bundle row still refers to, in order."""
    found: set[str] = set()
    with db.read() as session:
        for start in range(0, len(paths), _BATCH):
            batch = paths[start : start + _BATCH]
            found.update(
                session.scalars(select(Bundle.storage_path).where(Bundle.storage_path.in_(batch)))
            )
    return [path for path in paths if path in found]


def _remove_stale_uploads(tmp_dir: Path, cutoff: dt.datetime) -> list[str]:
    """Staged uploads not written to since `cutoff`: a live upload writes to its file as the
    bytes arrive and stalls for at most the upload idle timeout, far less than the grace."""
    removed = []
    for path in sorted(tmp_dir.glob("upload-*")):
        try:
            modified = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
            if path.is_file() and modified < cutoff:
                path.unlink()
                removed.append(str(path))
        except FileNotFoundError:  # finished or discarded meanwhile
            continue
    return removed
