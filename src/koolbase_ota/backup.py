"""`koolbase-ota backup DIR`: a consistent copy of an embedded install, taken while it serves.

The copy is itself a data dir (`koolbase-ota.db`, `bundles/`, `secret_key`): serving with
`KOOLBASE_OTA_DATA_DIR=DIR` restores it. Copying the data dir by hand while a server writes can
catch the SQLite database between its file and its write-ahead log, and a bundle deleted
between the two copies leaves a row without its file.

The database is copied with SQLite's online backup in one step (one snapshot, however much is
written meanwhile). Then each of its bundles' files is hard-linked (bundle files are never
rewritten), into the copy, or, where a link cannot reach it (another filesystem or mount), into
a staging directory in the store's directory: linking every file takes milliseconds, so a
file deleted after the snapshot (its bundle deleted) is found at once and the snapshot taken
again, and every row of the copy has its file. Only then are staged files copied and each
file checked against its checksum. The copy is made beside DIR, synced, and renamed to it
when whole: an interrupted backup leaves no DIR.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
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
#: How many times the snapshot is taken again while bundles are deleted as the files are linked.
MAX_SNAPSHOTS = 5
#: Where files are staged on the store's filesystem when the copy is on another one (outside
#: the store's `ota/` keys, which `gc` lists).
STAGING_PREFIX = ".backup-staging-"
_LOCK_FILE = ".lock"


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
    copied: list[str] = field(default_factory=list)
    #: Whether the bundle files stay in an S3 store, outside the copy.
    files_in_s3: bool = False
    #: How many snapshots of the database it took (more than one: bundles were deleted).
    snapshots: int = 0


def back_up(settings: Settings, target: Path) -> BackupReport:
    """Copy the install of `settings` (resolved) to the new directory `target`."""
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
    local = store if isinstance(store, LocalStore) else None
    target = target.expanduser().absolute()
    if target.exists() or target.is_symlink():
        raise BackupError(f"{target} already exists; name a new directory")
    if not target.parent.is_dir():
        raise BackupError(f"{target.parent} is not a directory")
    parent = target.parent.resolve()
    roots = [(settings.data_dir, "the data dir")]
    if local is not None:  # `gc` would take a copy in the store for orphaned files
        roots.append((local.root, "the bundle store"))
    copy = parent / target.name
    for root, what in roots:
        # Inside it, or it inside the copy (a store not made yet, whose place it would take).
        if parent.is_relative_to(root) or root.is_relative_to(copy):
            raise BackupError(f"{target} is inside {what}; name a directory outside it")
    # Owner-only, as the data dir: it holds the signing key and the hashes of every secret.
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    try:
        report = _copy_install(database, local, settings.data_dir, partial)
        os.sync()  # every file, link and directory of the copy on disk before it appears
        _rename_new(partial, target)
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
    files = to / BUNDLES_DIR
    with contextlib.ExitStack() as cleanup:
        staging = files
        try:
            rows = _linked_snapshot(database, copy, store, staging, report)
        except _CrossDevice:
            # Not linkable there: another filesystem, or another mount of the same one (a
            # container's volumes), which st_dev does not tell apart. Staged by links beside
            # the store, copied from there.
            assert store is not None
            shutil.rmtree(files, ignore_errors=True)
            staging = cleanup.enter_context(_staging_directory(store.root))
            rows = _linked_snapshot(database, copy, store, staging, report)
        if store is not None:
            report.missing = sorted(path for path in rows if not (staging / path).exists())
            report.files = _files_checked(rows, staging, files)
    for name in DATA_DIR_FILES:
        source = data_dir / name
        if source.is_file():
            shutil.copyfile(source, to / name)
            (to / name).chmod(0o600)
            report.copied.append(name)
    return report


class _CrossDevice(Exception):
    """A bundle file cannot be hard-linked into the copy (EXDEV)."""


@contextlib.contextmanager
def _staging_directory(root: Path) -> Iterator[Path]:
    """A new staging directory in the store's root, held (a lock on a file in it) while it is
    used and removed after; first, those of backups that ended without removing theirs (killed)
    are removed: nothing holds them, and their links would keep deleted bundles' space."""
    for stale in root.glob(STAGING_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime < 60:
                continue  # just made by a backup starting: not locked yet
        with contextlib.suppress(OSError), open(stale / _LOCK_FILE, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another backup's, under way
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        with open(staging / _LOCK_FILE, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _linked_snapshot(
    database: Path, copy: Path, store: LocalStore | None, staging: Path, report: BackupReport
) -> dict[str, str]:
    """Snapshot the database into `copy` and link its bundles' files into `staging`, again
    while files are found gone because their bundles were deleted since; its bundle rows."""
    for _ in range(MAX_SNAPSHOTS):
        _snapshot(database, copy)
        report.snapshots += 1
        rows, report.projects = _read_copy(copy)
        report.bundles = len(rows)
        if store is None:
            return rows
        gone = _link_files(rows, store, staging)
        if not gone or _still_there(database, gone):
            # None gone, or every one gone still a bundle of the install (its file missing
            # there: reported, as `gc` does); otherwise bundles were deleted since: again.
            return rows
    raise BackupError(
        f"bundles were deleted while their files were linked, {MAX_SNAPSHOTS} times in a row;"
        " run backup again"
    )


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


def _open_install(database: Path) -> sqlite3.Connection:
    """The install's database, never created when it is not there (`mode=rw`)."""
    return sqlite3.connect(f"file:{quote(str(database))}?mode=rw", uri=True, timeout=30)


def _read_copy(database: Path) -> tuple[dict[str, str], int]:
    """storage path -> checksum of every bundle of `database`, and how many projects it has."""
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
        (projects,) = connection.execute("SELECT count(*) FROM projects").fetchone()
        return dict(rows), int(projects)


def _still_there(database: Path, paths: list[str]) -> bool:
    """Whether the install's database still has a bundle at each of `paths`."""
    with contextlib.closing(_open_install(database)) as connection:
        return all(
            connection.execute("SELECT 1 FROM bundles WHERE storage_path = ?", (path,)).fetchone()
            for path in paths
        )


def _link_files(rows: dict[str, str], store: LocalStore, staging: Path) -> list[str]:
    """Hard-link each bundle's file into `staging` (unless there from an earlier snapshot),
    removing those no row of this snapshot has; the storage paths of files not found."""
    for kept in _files_under(staging):
        if kept not in rows and kept != _LOCK_FILE:
            (staging / kept).unlink()
    linked = LocalStore(staging, public_url=store.public_url, secret_key=store.secret_key)
    gone = []
    for storage_path in rows:
        try:
            source, target = store.path_for(storage_path), linked.path_for(storage_path)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source, target)  # the same bytes, never rewritten: nothing to copy
        except (FileNotFoundError, ObjectNotFound):
            gone.append(storage_path)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise _CrossDevice from None
            raise
    return gone


def _files_checked(rows: dict[str, str], staging: Path, files: Path) -> int:
    """Copy each linked file from `staging` into `files` (when they differ), and check it
    against its bundle's checksum; how many there are."""
    count = 0
    for storage_path, checksum in sorted(rows.items()):
        source, target = staging / storage_path, files / storage_path
        if not source.exists():
            continue  # missing in the install: reported
        if source != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        if file_checksum(target) != checksum:
            raise BackupError(
                f"the file of the bundle at {storage_path} does not match its checksum in the"
                " install; restore the file or delete the bundle, then run backup again"
            )
        count += 1
    return count


def _files_under(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return [path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()]


_RENAME_NOREPLACE = 1


def _rename_new(source: Path, target: Path) -> None:
    """Rename `source` to `target`, which must not exist: `os.rename` would replace an empty
    directory made there meanwhile. Linux's renameat2 refuses it; elsewhere, a rename."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        os.rename(source, target)
        return
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), _RENAME_NOREPLACE):
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL):  # not on this kernel or filesystem
            os.rename(source, target)
            return
        if code == errno.EEXIST:
            raise BackupError(f"{target} appeared while the backup ran; name a new directory")
        raise OSError(code, os.strerror(code), str(target))
