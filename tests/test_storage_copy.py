"""`BundleStore.copy`, used by promote: inside the store, create-only, one "not found", on local
disk and on a real S3 server (SeaweedFS, which has no conditional copy)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from koolbase_ota.storage import BundleStore, ObjectExists, ObjectNotFound
from koolbase_ota.storage.local import LocalStore
from koolbase_ota.storage.s3 import CHUNK_BYTES
from tests.test_storage import store

__all__ = ["store"]  # the fixture, shared with the store's own tests


def stored_bytes(store: BundleStore, key: str) -> bytes:
    if isinstance(store, LocalStore):
        return store.path_for(key).read_bytes()
    response = httpx.get(store.download_url(key, ttl_seconds=60), timeout=30)
    assert response.status_code == 200, response.text
    return response.content


def put(store: BundleStore, tmp_path: Path, key: str, data: bytes) -> None:
    path = tmp_path / f"{len(os.listdir(tmp_path))}.zip"
    path.write_bytes(data)
    asyncio.run(store.put_file(key, path))


@pytest.mark.parametrize("size", [1000, CHUNK_BYTES + 12345], ids=["small", "multipart-sized"])
def test_copy_makes_a_second_object_with_the_same_bytes(
    store: BundleStore, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    put(store, tmp_path, "ota/p/staging/v1.zip", data)

    asyncio.run(store.copy("ota/p/staging/v1.zip", "ota/p/production/v7.zip"))

    assert stored_bytes(store, "ota/p/production/v7.zip") == data
    # The copy stands on its own: removing the source leaves it whole.
    asyncio.run(store.delete("ota/p/staging/v1.zip"))
    assert stored_bytes(store, "ota/p/production/v7.zip") == data
    keys = {item.key for item in asyncio.run(store.list_keys("ota/"))}
    assert keys == {"ota/p/production/v7.zip"}


def test_copy_never_overwrites(store: BundleStore, tmp_path: Path) -> None:
    put(store, tmp_path, "ota/p/staging/v1.zip", b"source")
    put(store, tmp_path, "ota/p/production/v1.zip", b"already there")

    with pytest.raises(ObjectExists):
        asyncio.run(store.copy("ota/p/staging/v1.zip", "ota/p/production/v1.zip"))

    assert stored_bytes(store, "ota/p/production/v1.zip") == b"already there"


def test_copying_a_missing_object_is_the_one_not_found(store: BundleStore) -> None:
    with pytest.raises(ObjectNotFound):
        asyncio.run(store.copy("ota/p/staging/v404.zip", "ota/p/production/v1.zip"))

    assert not asyncio.run(store.exists("ota/p/production/v1.zip"))
