"""Where bundle files live: one interface, a local-disk and (later) S3-compatible backends."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlparse

from koolbase_ota.errors import NotFound, StorageUnavailable

if TYPE_CHECKING:
    from koolbase_ota.config import Settings


class ObjectNotFound(NotFound):
    """The store has no object under that key; every backend maps its own error to this one."""

    default_code = "object_not_found"


class ObjectExists(StorageUnavailable):
    """Objects are create-only; finding one already there means something else went wrong."""

    default_code = "object_exists"


class StoreOutcomeUnknown(StorageUnavailable):
    """A write failed in a way that may still have stored the object: a timeout or a dropped
    connection, after which the store can finish the request it already holds. Whoever wrote
    must keep the key recorded for `gc` rather than assume nothing is there."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    modified_at: dt.datetime


class BundleStore(Protocol):
    """What the server needs from an object store."""

    #: True when devices download from this server (local disk) rather than from the store.
    serves_downloads: bool
    #: `put_file` keeps the very file it is given (a hard link): it must be on disk (fsync).
    keeps_spooled_file: bool

    async def put_file(self, key: str, source: Path) -> None:
        """Store the file at `source` under `key`; never overwrites an existing object."""

    async def copy(self, source_key: str, target_key: str) -> None:
        """Copy an object inside the store, create-only (ObjectExists when the target is there,
        ObjectNotFound when the source is not); the bytes never pass through this server."""

    async def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    async def checksum(self, key: str) -> str:
        """The SHA-256 of the stored bytes, in a bundle's checksum form (`sha256:<hex>`), read
        back in chunks, never whole in memory (ObjectNotFound when nothing is there)."""

    async def list_keys(self, prefix: str) -> list[StoredObject]:
        """Every object whose key starts with `prefix`."""

    def download_url(self, key: str, *, ttl_seconds: int) -> str:
        """A URL a device can GET without credentials, valid for `ttl_seconds`."""

    async def check(self) -> None:
        """Raise StorageUnavailable when the store cannot be used."""


def open_store(settings: Settings) -> BundleStore:
    """Build the store named by KOOLBASE_OTA_STORAGE_URL (`file://...` or `s3://bucket/prefix`)."""
    parsed = urlparse(settings.storage_url)
    if parsed.scheme == "file":
        from koolbase_ota.storage.local import LocalStore

        # A file URL's path is percent-encoded (`/srv/my%20data`, as the default's
        # `Path.as_uri()` writes a data dir with a space): the folder is its decoded name.
        return LocalStore(
            Path(unquote(parsed.path)),
            public_url=settings.public_url,
            secret_key=settings.secret_key,
        )
    if parsed.scheme == "s3":
        from koolbase_ota.storage.s3 import S3BundleStore

        if not parsed.netloc:
            raise ValueError("KOOLBASE_OTA_STORAGE_URL must name a bucket: s3://BUCKET[/PREFIX]")
        return S3BundleStore(
            bucket=parsed.netloc,
            prefix=parsed.path,
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            timeout_seconds=settings.storage_timeout_seconds,
            credentials=settings.s3_credentials(),
        )
    raise ValueError(f"unsupported KOOLBASE_OTA_STORAGE_URL scheme: {parsed.scheme!r}")
