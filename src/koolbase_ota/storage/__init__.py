"""Where bundle files live: one interface, a local-disk and (later) S3-compatible backends."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from koolbase_ota.errors import NotFound, StorageUnavailable


class ObjectNotFound(NotFound):
    """The store has no object under that key; every backend maps its own error to this one."""

    default_code = "object_not_found"


class ObjectExists(StorageUnavailable):
    """Objects are create-only; finding one already there means something else went wrong."""

    default_code = "object_exists"


@dataclass(frozen=True)
class StoredObject:
    key: str
    modified_at: dt.datetime


class BundleStore(Protocol):
    """What the server needs from an object store."""

    #: True when devices download from this server (local disk) rather than from the store.
    serves_downloads: bool

    async def put_file(self, key: str, source: Path) -> None:
        """Store the file at `source` under `key`; never overwrites an existing object."""

    async def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    async def list_keys(self, prefix: str) -> list[StoredObject]:
        """Every object whose key starts with `prefix`."""

    def download_url(self, key: str, *, ttl_seconds: int) -> str:
        """A URL a device can GET without credentials, valid for `ttl_seconds`."""

    async def check(self) -> None:
        """Raise StorageUnavailable when the store cannot be used."""


def open_store(url: str, *, public_url: str, secret_key: str) -> BundleStore:
    """Build the store named by KOOLBASE_OTA_STORAGE_URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from koolbase_ota.storage.local import LocalStore

        return LocalStore(Path(parsed.path), public_url=public_url, secret_key=secret_key)
    raise ValueError(f"unsupported KOOLBASE_OTA_STORAGE_URL scheme: {parsed.scheme!r}")
