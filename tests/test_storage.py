"""Both bundle stores keep the same promises: create-only writes (small and multipart-sized),
one "not found", idempotent delete, listing, and URLs a device can fetch."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import httpx
import pytest

from koolbase_ota.storage import BundleStore, ObjectExists, ObjectNotFound
from koolbase_ota.storage.local import LocalStore
from koolbase_ota.storage.s3 import CHUNK_BYTES, S3BundleStore
from tests.conftest import new_project, start_server, uploaded
from tests.services import SeaweedService


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BundleStore:
    if request.param == "local":
        return LocalStore(
            tmp_path / "bundles", public_url="http://127.0.0.1:1", secret_key="k" * 32
        )
    seaweed: SeaweedService = request.getfixturevalue("seaweed")
    return S3BundleStore(
        bucket=seaweed.bucket,
        prefix=seaweed.unique_prefix(),
        endpoint=seaweed.endpoint,
        region=seaweed.region,
        credentials={"access_key_id": seaweed.access_key, "secret_access_key": seaweed.secret_key},
    )


@pytest.mark.parametrize("size", [1000, CHUNK_BYTES + 12345], ids=["one-put", "multipart"])
def test_objects_are_written_create_only(store: BundleStore, tmp_path: Path, size: int) -> None:
    first = tmp_path / "first.zip"
    first.write_bytes(os.urandom(size))
    second = tmp_path / "second.zip"
    second.write_bytes(os.urandom(size))
    asyncio.run(store.put_file("ota/p/production/v1.zip", first))
    with pytest.raises(ObjectExists):
        asyncio.run(store.put_file("ota/p/production/v1.zip", second))
    assert asyncio.run(store.exists("ota/p/production/v1.zip"))
    if isinstance(store, S3BundleStore):
        url = store.download_url("ota/p/production/v1.zip", ttl_seconds=60)
        response = httpx.get(url, timeout=30)
        assert response.status_code == 200
        assert (
            hashlib.sha256(response.content).digest() == hashlib.sha256(first.read_bytes()).digest()
        )
        assert response.headers["content-type"] == "application/zip"


def test_delete_is_idempotent_and_listing_sees_what_is_there(
    store: BundleStore, tmp_path: Path
) -> None:
    source = tmp_path / "b.zip"
    source.write_bytes(b"zip")
    for version in (1, 2):
        asyncio.run(store.put_file(f"ota/p/staging/v{version}.zip", source))
    listed = {item.key for item in asyncio.run(store.list_keys("ota/"))}
    assert listed == {"ota/p/staging/v1.zip", "ota/p/staging/v2.zip"}
    asyncio.run(store.delete("ota/p/staging/v1.zip"))
    asyncio.run(store.delete("ota/p/staging/v1.zip"))
    asyncio.run(store.delete("ota/p/never/v9.zip"))
    assert not asyncio.run(store.exists("ota/p/staging/v1.zip"))
    assert {item.key for item in asyncio.run(store.list_keys("ota/"))} == {"ota/p/staging/v2.zip"}


def test_a_missing_object_is_the_one_not_found(store: BundleStore) -> None:
    assert not asyncio.run(store.exists("ota/p/production/v404.zip"))
    if isinstance(store, S3BundleStore):
        with pytest.raises(ObjectNotFound):
            asyncio.run(store.copy("ota/p/production/v404.zip", "ota/p/production/v405.zip"))


def test_multipart_uploads_take_turns_and_a_queued_one_gives_up_in_bounded_time(
    seaweed: SeaweedService, tmp_path: Path
) -> None:
    """One multipart transfer at a time per process keeps four concurrent 50 MiB uploads
    within the memory of one; one stuck behind a hung transfer is a 503, not a wait forever."""
    from koolbase_ota.errors import StorageUnavailable

    store = S3BundleStore(
        bucket=seaweed.bucket,
        prefix=seaweed.unique_prefix(),
        endpoint=seaweed.endpoint,
        region=seaweed.region,
        timeout_seconds=1,
        credentials={"access_key_id": seaweed.access_key, "secret_access_key": seaweed.secret_key},
    )
    source = tmp_path / "big.zip"
    source.write_bytes(os.urandom(CHUNK_BYTES + 1))

    async def scenario() -> None:
        async with store._one_transfer():  # a transfer that does not finish
            with pytest.raises(StorageUnavailable, match="busy"):
                await store.put_file("ota/p/production/v1.zip", source)
        # Once it is done, the next one goes through; two at once both complete.
        await asyncio.gather(
            store.put_file("ota/p/production/v1.zip", source),
            store.put_file("ota/p/production/v2.zip", source),
        )

    asyncio.run(scenario())
    assert asyncio.run(store.exists("ota/p/production/v1.zip"))
    assert asyncio.run(store.exists("ota/p/production/v2.zip"))


@pytest.mark.parametrize("name", ["my data", "données", "100%"])
def test_a_data_dir_whose_name_needs_escaping_keeps_the_bundles_inside_it(
    tmp_path: Path, name: str
) -> None:
    """The default store URL is the data dir's `as_uri()`, percent-encoded: read undecoded, the
    bundles went to a sibling folder literally named `my%20data`, outside the data dir."""
    data_dir = tmp_path / name
    server = start_server(data_dir)
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            project = new_project(server.db)
            bundle = uploaded(client, project)
        stored = data_dir / "bundles" / bundle["storage_path"]
        assert stored.is_file()
        assert sorted(path.name for path in tmp_path.iterdir()) == [name]
    finally:
        server.stop()
