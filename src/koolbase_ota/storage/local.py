"""Bundles as files on local disk, downloaded through signed URLs served by this server."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

import anyio.to_thread

from koolbase_ota.errors import StorageUnavailable
from koolbase_ota.storage import ObjectExists, ObjectNotFound, StoredObject
from koolbase_ota.storage.signing import signed_path

#: How much of a file is read into Python at a time.
READ_BYTES = 1024 * 1024


class LocalStore:
    serves_downloads = True
    keeps_spooled_file = True

    def __init__(self, root: Path, *, public_url: str, secret_key: str) -> None:
        self.root = root.resolve()
        self._inside = str(self.root) + os.sep
        self.public_url = public_url.rstrip("/")
        self.secret_key = secret_key

    def path_for(self, key: str) -> Path:
        """The file for `key`; keys are our own `ota/...` paths, never user input.

        Lexical, with no system call (it runs on every download): `..` and absolute keys
        cannot leave the root, which was itself resolved once.
        """
        path = os.path.normpath(os.path.join(self._inside, key))
        if not path.startswith(self._inside):
            raise ObjectNotFound("object not found")
        return Path(path)

    async def put_file(self, key: str, source: Path) -> None:
        await anyio.to_thread.run_sync(self._put_file, key, source)

    def _put_file(self, key: str, source: Path) -> None:
        target = self.path_for(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                # A hard link is atomic and fails if the target exists: create-only for free.
                os.link(source, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_then_link(source, target)
            fsync_dir(target.parent)
        except FileExistsError as exc:
            raise ObjectExists(f"an object is already stored at {key}") from exc
        except OSError as exc:
            raise StorageUnavailable(f"could not store the bundle: {exc.strerror}") from exc

    async def copy(self, source_key: str, target_key: str) -> None:
        await anyio.to_thread.run_sync(self._copy, source_key, target_key)

    def _copy(self, source_key: str, target_key: str) -> None:
        source = self.path_for(source_key)
        if not source.is_file():
            raise ObjectNotFound(f"no object at {source_key}")
        # The same create-only, crash-safe path as an upload: a hard link of the source (its
        # bytes are never rewritten, so sharing them is safe), or a copy linked into place.
        try:
            self._put_file(target_key, source)
        except StorageUnavailable:
            if not source.is_file():  # deleted between our look and the link
                raise ObjectNotFound(f"no object at {source_key}") from None
            raise

    @staticmethod
    def _copy_then_link(source: Path, target: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    async def delete(self, key: str) -> None:
        try:
            self.path_for(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"could not delete the bundle: {exc.strerror}") from exc

    async def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    async def checksum(self, key: str) -> str:
        return await anyio.to_thread.run_sync(self._checksum, key)

    def _checksum(self, key: str) -> str:
        try:
            return file_checksum(self.path_for(key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object at {key}") from None
        except OSError as exc:
            raise StorageUnavailable(f"could not read the bundle: {exc.strerror}") from exc

    async def list_keys(self, prefix: str) -> list[StoredObject]:
        """Every file under `prefix`, a copy's `.incoming-` temporary too: one a crash left
        behind is unreferenced and as old as the crash, so `gc` removes it like any unknown
        file (it was skipped before, and stayed forever); one being written is newer than any
        grace period."""
        return await anyio.to_thread.run_sync(self._list_keys, prefix)

    def _list_keys(self, prefix: str) -> list[StoredObject]:
        found = []
        # os.walk passes over a directory removed while it walks; each file is looked at once,
        # and one deleted meanwhile (a bundle deleted while `gc` lists) is not there to list.
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = Path(directory, name)
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    status = path.stat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(status.st_mode):
                    modified = dt.datetime.fromtimestamp(status.st_mtime, dt.UTC)
                    found.append(StoredObject(key=key, modified_at=modified))
        return found

    def download_url(self, key: str, *, ttl_seconds: int) -> str:
        return self.public_url + signed_path(self.secret_key, key, ttl_seconds=ttl_seconds)

    async def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise StorageUnavailable(f"bundle directory {self.root} is not writable")
        except OSError as exc:
            raise StorageUnavailable(f"bundle directory unusable: {exc.strerror}") from exc


def file_checksum(path: Path) -> str:
    """`sha256:` and the hex SHA-256 of a file's bytes, as bundles record them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_BYTES):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
