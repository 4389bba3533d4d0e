"""`koolbase-ota move` reads every object back from the target store: one already there (a rerun,
or something else sharing the prefix) is trusted only if its bytes match the bundle's checksum.
Also `BundleStore.checksum`, which does the reading, on local disk and on a real S3 server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest

from koolbase_ota.cli import DEFAULT_MOVE_JOBS
from koolbase_ota.errors import StorageUnavailable
from koolbase_ota.storage import BundleStore, ObjectNotFound
from koolbase_ota.storage.s3 import CHUNK_BYTES, S3BundleStore
from koolbase_ota.transfer import MoveError, move_install
from tests.conftest import RunningServer, new_project, released, start_server
from tests.services import SeaweedService, free_ports
from tests.test_cli import run_cli
from tests.test_move_safety import Target, target
from tests.test_storage import store
from tests.test_storage_copy import put

__all__ = ["store", "target"]  # the fixtures, shared with the stores' and move's own tests

MIB = 1024 * 1024


def checksum_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "size",
    [0, 1000, CHUNK_BYTES + 12345, 2 * CHUNK_BYTES],
    ids=["empty", "small", "several-chunks", "part-boundary"],
)
def test_checksum_is_the_sha256_of_the_stored_bytes(
    store: BundleStore, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    put(store, tmp_path, "ota/p/production/v1.zip", data)

    assert asyncio.run(store.checksum("ota/p/production/v1.zip")) == checksum_of(data)


def test_checksum_reads_a_large_object_a_chunk_at_a_time(
    store: BundleStore, tmp_path: Path
) -> None:
    """Never the whole object in Python's memory: a bundle can be as large as the upload limit."""
    size = 3 * CHUNK_BYTES
    put(store, tmp_path, "ota/p/production/v1.zip", os.urandom(size))

    tracemalloc.start()
    try:
        asyncio.run(store.checksum("ota/p/production/v1.zip"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Two 1 MiB reads at most (one being hashed, the next arriving), far from the whole.
    assert peak < 4 * MIB < size


def test_checksum_of_a_missing_object_is_the_one_not_found(store: BundleStore) -> None:
    with pytest.raises(ObjectNotFound):
        asyncio.run(store.checksum("ota/p/production/v404.zip"))


def test_checksum_on_an_unreachable_store_is_storage_unavailable(seaweed: SeaweedService) -> None:
    store = S3BundleStore(
        bucket=seaweed.bucket,
        endpoint=f"http://127.0.0.1:{free_ports(1)[0]}",  # nothing listens there
        region=seaweed.region,
        timeout_seconds=1,
        credentials={"access_key_id": seaweed.access_key, "secret_access_key": seaweed.secret_key},
    )
    with pytest.raises(StorageUnavailable, match="could not read the bundle back"):
        asyncio.run(store.checksum("ota/p/production/v1.zip"))


def embedded_install(data_dir: Path, count: int) -> tuple[RunningServer, list[dict[str, Any]]]:
    """An embedded install with one project and `count` released bundles, its server stopped
    (its database and store still usable, as `move` uses them)."""
    source = start_server(data_dir)
    try:
        project = new_project(source.db, "moving")
        with httpx.Client(base_url=source.base_url, timeout=30) as client:
            return source, [released(client, project) for _ in range(count)]
    finally:
        source.stop()


def test_a_rerun_refuses_an_object_already_there_with_other_bytes(
    tmp_path: Path, target: Target
) -> None:
    """Left by something else at the key (another install sharing the prefix, a broken copy):
    trusted unread, every device would have been offered a bundle failing its checksum."""
    data_dir = tmp_path / "embedded"
    _, (first, second) = embedded_install(data_dir, 2)
    key = first["storage_path"]
    right = (data_dir / "bundles" / key).read_bytes()
    put(target.store, tmp_path, key, right[: len(right) // 2])

    args, env = target.move_command(data_dir)
    moved = run_cli(data_dir, *args, env=env)

    assert moved.returncode == 1
    assert moved.stderr == (
        f"error: bundle {first['id']} (production v1): the object already at {key} in the"
        " target store does not match the bundle's checksum, so no row was written; if no other"
        " install uses that --storage-url, remove the object at that key from the target store,"
        " otherwise point --storage-url at an empty prefix, then run move again\n"
    )
    assert moved.stdout == ""
    assert target.count("projects") == 0
    assert target.count("bundles") == 0

    # Doing what the message says is enough: the next run copies the right bytes. (The
    # second file's copy was under way beside the first's, so it finished: already there.)
    asyncio.run(target.store.delete(key))
    again = run_cli(data_dir, *args, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(
        "copied 1 bundle files (and 1 already there); read back 2, each matching its"
        " checksum; rows: "
    )
    for bundle in (first, second):
        stored = asyncio.run(target.store.checksum(bundle["storage_path"]))
        assert stored == bundle["checksum"]


def test_a_rerun_after_an_interrupted_move_reads_back_what_the_first_run_copied(
    tmp_path: Path, target: Target
) -> None:
    data_dir = tmp_path / "embedded"
    _, (first, second) = embedded_install(data_dir, 2)
    # The first run stops at the second bundle, whose file is damaged, after copying the first.
    damaged = data_dir / "bundles" / second["storage_path"]
    intact = damaged.read_bytes()
    damaged.write_bytes(b"damaged")
    args, env = target.move_command(data_dir)
    interrupted = run_cli(data_dir, *args, env=env)
    assert interrupted.returncode == 1
    assert "does not match its checksum" in interrupted.stderr
    assert asyncio.run(target.store.exists(first["storage_path"]))
    assert target.count("projects") == 0

    damaged.write_bytes(intact)
    moved = run_cli(data_dir, *args, env=env)

    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.startswith(
        "copied 1 bundle files (and 1 already there); read back 2, each matching its checksum;"
        " rows: "
    )
    assert target.count("projects") == 1
    assert target.count("bundles") == 2
    # What to do next names the key the servers must sign with to keep the signatures.
    assert str(data_dir.resolve() / "secret_key") in moved.stdout


class KeepsOtherBytes:
    """The target store, keeping a truncated copy of what it is given: a store that corrupts a
    write, a fault no real server here can be made to commit."""

    def __init__(self, store: BundleStore, tmp_path: Path) -> None:
        self.store = store
        self.tmp_path = tmp_path

    async def put_file(self, key: str, source: Path) -> None:
        truncated = self.tmp_path / "truncated.zip"
        truncated.write_bytes(source.read_bytes()[:-1])
        await self.store.put_file(key, truncated)

    async def checksum(self, key: str) -> str:
        return await self.store.checksum(key)


def test_an_object_the_store_kept_wrong_stops_the_move(tmp_path: Path, target: Target) -> None:
    source, (bundle,) = embedded_install(tmp_path / "embedded", 1)
    # Not a whole BundleStore: only the two methods a move calls on its target.
    faulty: Any = KeepsOtherBytes(target.store, tmp_path)
    try:
        with pytest.raises(MoveError) as refused:
            asyncio.run(
                move_install(
                    source_db=source.db,
                    source_store=source.store,
                    target_db=target.db,
                    target_store=faulty,
                    jobs=DEFAULT_MOVE_JOBS,
                )
            )
    finally:
        source.db.dispose()
    assert str(refused.value).startswith(
        f"bundle {bundle['id']} (production v1): the object copied to {bundle['storage_path']}"
        " in the target store does not match the bundle's checksum, so no row was written; "
    )
    assert target.count("projects") == 0


def test_a_move_may_keep_the_bundles_on_a_disk(tmp_path: Path, target: Target) -> None:
    """`--storage-url file:///PATH`: PostgreSQL for the records, a directory (a disk of its
    own, or one every process mounts) for the bundles, each read back from there."""
    data_dir = tmp_path / "embedded"
    _, bundles = embedded_install(data_dir, 2)
    moved_to = tmp_path / "moved-bundles"
    args = ["move", "--database-url", target.database_url, "--storage-url", moved_to.as_uri()]
    moved = run_cli(data_dir, *args)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.startswith("copied 2 bundle files; read back 2, each matching")
    for bundle in bundles:
        copied = (moved_to / bundle["storage_path"]).read_bytes()
        assert "sha256:" + hashlib.sha256(copied).hexdigest() == bundle["checksum"]
    assert target.count("bundles") == 2
