"""`koolbase-ota backup DIR`: a consistent copy of an embedded install, taken while it serves.

The copy is itself a data dir (`koolbase-ota.db`, `bundles/`, `secret_key`): serving with
`KOOLBASE_OTA_DATA_DIR=DIR` restores it. Copying the data dir by hand while a server writes can
catch the SQLite database between its file and its write-ahead log, and a bundle deleted
between the two copies leaves a row without its file.

The database is copied with SQLite's online backup in one step (one snapshot, however much is
written meanwhile); then each of its bundles' files is hard-linked (bundle files are never
rewritten) or copied, and checked against its checksum. A file deleted after the snapshot (its
bundle deleted) makes it take the snapshot again, so every row of the copy has its file. The
copy is made beside DIR and renamed to it when whole: an interrupted backup leaves no DIR.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from sqlalchemy.engine import make_url

from koolbase_ota.config import SECRET_KEY_FILE, Settings
from koolbase_ota.errors import InvalidInput
from koolbase_ota.storage import ObjectNotFound, open_store
from koolbase_ota.storage.local import LocalStore, file_checksum, fsync_dir

DATABASE_FILE = "koolbase-ota.db"
BUNDLES_DIR = "bundles"
#: Copied beside the database when the data dir has them: the signing key and the first
#: project's credentials.
DATA_DIR_FILES = (SECRET_KEY_FILE, "credentials.json")
#: How many times the snapshot is taken again while bundles are deleted as the files are copied.
MAX_SNAPSHOTS = 5


class BackupError(InvalidInput):
    default_code = "backup_refused"


@dataclass
class BackupReport:
    projects: int = 0
    bundles: int = 0
    #: Bundle files in the copy, each read and found to match its checksum.
    files: int = 0
    #: Bundles of the copy whose file is not in the install (nor, so, in the copy).
    missing: list[str] = field(default_factory=list)
    #: Files of DATA_DIR_FILES copied.
    extras: list[str] = field(default_factory=list)
    #: Whether the bundle files stay in an S3 store, outside the copy.
    files_in_s3: bool = False


def back_up(settings: Settings, target: Path) -> BackupReport:
    """Copy the install of `settings` (resolved, migrated) to the new directory `target`."""
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        raise BackupError(
            "backup copies the embedded default's SQLite database; back up PostgreSQL with"
            " pg_dump or your provider's snapshots (docs/DEPLOYMENT.md, Backups)"
        )
    database = Path(url.database)
    if not database.is_file():
        raise BackupError(f"there is no database at {database}; is KOOLBASE_OTA_DATA_DIR right?")
    store = open_store(settings)
    target = target.expanduser().absolute()
    if target.exists() or target.is_symlink():
        raise BackupError(f"{target} already exists; name a new directory")
    if not target.parent.is_dir():
        raise BackupError(f"{target.parent} is not a directory")
    if target.parent.resolve().is_relative_to(settings.data_dir):
        raise BackupError(f"{target} is inside the data dir; name a directory outside it")
    # Owner-only, as the data dir: it holds the signing key and the hashes of every secret.
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        report = _copy_install(
            database,
            store if isinstance(store, LocalStore) else None,
            settings.data_dir,
            partial,
        )
        fsync_dir(partial)
        os.rename(partial, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def _copy_install(
    database: Path, store: LocalStore | None, data_dir: Path, to: Path
) -> BackupReport:
    copy = to / DATABASE_FILE
    report = BackupReport(files_in_s3=store is None)
    for _ in range(MAX_SNAPSHOTS):
        _snapshot(database, copy)
        rows = _bundle_rows(copy)
        report.projects = _count_projects(copy)
        report.bundles = len(rows)
        if store is None:
            break
        gone = _copy_files(rows, store, to / BUNDLES_DIR, report)
        if not gone or _still_there(database, gone):
            # None gone, or every one gone still a bundle of the install (its file missing
            # there: reported, as `gc` does); otherwise bundles were deleted since: again.
            report.missing = sorted(gone)
            break
    else:
        raise BackupError(
            f"bundles were deleted while their files were copied, {MAX_SNAPSHOTS} times in a"
            " row; run backup again when the install is quieter"
        )
    for name in DATA_DIR_FILES:
        source = data_dir / name
        if source.is_file():
            shutil.copyfile(source, to / name)
            (to / name).chmod(0o600)
            report.extras.append(name)
    return report


def _snapshot(database: Path, copy: Path) -> None:
    """The database at one moment, written to `copy` (replaced); its journal mode kept."""
    with contextlib.suppress(FileNotFoundError):
        copy.unlink()
    with (
        contextlib.closing(_open_install(database)) as source,
        contextlib.closing(sqlite3.connect(copy)) as target,
    ):
        source.backup(target)  # every page in one step: one snapshot
    copy.chmod(0o600)
    with open(copy, "rb") as handle:
        os.fsync(handle.fileno())


def _open_install(database: Path) -> sqlite3.Connection:
    """The install's database, never created when it is not there (`mode=rw`)."""
    return sqlite3.connect(f"file:{quote(str(database))}?mode=rw", uri=True, timeout=30)


def _bundle_rows(database: Path) -> dict[str, str]:
    """storage path -> checksum of every bundle of `database`."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        try:
            rows = connection.execute("SELECT storage_path, checksum FROM bundles").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            raise BackupError(
                "the database has no koolbase-ota tables: nothing to back up (a server never"
                " started on it, or KOOLBASE_OTA_DATA_DIR names another directory)"
            ) from None
        return dict(rows)


def _count_projects(database: Path) -> int:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        (count,) = connection.execute("SELECT count(*) FROM projects").fetchone()
        return int(count)


def _still_there(database: Path, paths: list[str]) -> bool:
    """Whether the install's database still has a bundle at each of `paths`."""
    with contextlib.closing(_open_install(database)) as connection:
        return all(
            connection.execute("SELECT 1 FROM bundles WHERE storage_path = ?", (path,)).fetchone()
            for path in paths
        )


def _copy_files(
    rows: dict[str, str], store: LocalStore, to: Path, report: BackupReport
) -> list[str]:
    """Link or copy each bundle's file into `to`, keeping those already there from an earlier
    snapshot and removing those no row of this one has; the storage paths of files not found."""
    for kept in _files_under(to):
        if kept not in rows:
            (to / kept).unlink()
    copies = LocalStore(to, public_url=store.public_url, secret_key=store.secret_key)
    gone = []
    report.files = 0
    for storage_path, checksum in sorted(rows.items()):
        try:
            source, target = store.path_for(storage_path), copies.path_for(storage_path)
            if not target.is_file():
                _link_or_copy(source, target)
        except (FileNotFoundError, ObjectNotFound):
            gone.append(storage_path)
            continue
        if file_checksum(target) != checksum:
            raise BackupError(
                f"the file of the bundle at {storage_path} does not match its checksum in the"
                " install; restore the file or delete the bundle, then run backup again"
            )
        report.files += 1
    return gone


def _files_under(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return [path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()]


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # the same bytes, never rewritten: nothing to copy
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(source, target)
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())
