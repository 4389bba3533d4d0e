"""`koolbase-ota move` when something is wrong: the source changes under it, holds nothing, or
has a bundle whose file is gone or damaged. Each is refused with no row in the target."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy import table as table_named

from koolbase_ota.bundles.models import Bundle
from koolbase_ota.cli import DEFAULT_MOVE_JOBS
from koolbase_ota.db import Database, create_db_engine, upgrade_schema
from koolbase_ota.storage import BundleStore
from koolbase_ota.storage.s3 import S3BundleStore
from koolbase_ota.transfer import MoveError, move_install
from tests.conftest import RunningServer, new_project, released, start_server, uploaded
from tests.services import PostgresService, SeaweedService
from tests.test_cli import cli_env, run_cli


class Target:
    """An empty PostgreSQL database and S3 prefix to move into."""

    def __init__(self, postgres: PostgresService, seaweed: SeaweedService, tmp_path: Path):
        self.database_url = postgres.create_database()
        self.prefix = seaweed.unique_prefix()
        self.seaweed = seaweed
        engine = create_db_engine(self.database_url)
        upgrade_schema(engine, lock_dir=tmp_path)
        self.db = Database(engine)
        self.store = S3BundleStore(
            bucket=seaweed.bucket,
            prefix=self.prefix,
            endpoint=seaweed.endpoint,
            region=seaweed.region,
            credentials={
                "access_key_id": seaweed.access_key,
                "secret_access_key": seaweed.secret_key,
            },
        )

    def count(self, table: str) -> int:
        with self.db.read() as session:
            return int(session.scalar(select(func.count()).select_from(table_named(table))) or 0)

    def move_command(self, data_dir: Path) -> tuple[list[str], dict[str, str]]:
        args = [
            "move",
            "--database-url",
            self.database_url,
            "--storage-url",
            f"s3://{self.seaweed.bucket}/{self.prefix}",
            "--s3-endpoint",
            self.seaweed.endpoint,
            "--s3-region",
            self.seaweed.region,
        ]
        env = cli_env(
            data_dir,
            AWS_ACCESS_KEY_ID=self.seaweed.access_key,
            AWS_SECRET_ACCESS_KEY=self.seaweed.secret_key,
        )
        return args, env


@pytest.fixture
def target(postgres: PostgresService, seaweed: SeaweedService, tmp_path: Path) -> Iterator[Target]:
    target = Target(postgres, seaweed, tmp_path / "target-lock")
    yield target
    target.db.dispose()


class UploadDuringCopy:
    """The target store, with a real upload to the still-running source server made while the
    move copies its first file: what a server left running during a move does."""

    def __init__(self, store: BundleStore, upload: Any) -> None:
        self.store = store
        self.upload = upload

    async def put_file(self, key: str, source: Path) -> None:
        await self.store.put_file(key, source)
        if self.upload is not None:
            upload, self.upload = self.upload, None
            await asyncio.to_thread(upload)

    async def checksum(self, key: str) -> str:
        return await self.store.checksum(key)


def test_a_change_to_the_source_during_the_move_writes_no_row(
    tmp_path: Path, target: Target
) -> None:
    source = start_server(tmp_path / "embedded")
    try:
        project = new_project(source.db, "moving")
        with httpx.Client(base_url=source.base_url, timeout=30) as client:
            released(client, project)
            uploaded(client, project)
            store = UploadDuringCopy(
                target.store, lambda: uploaded(client, project, channel="staging")
            )
            with pytest.raises(MoveError, match="the source changed during the move"):
                asyncio.run(_move(source, target, store))
        # Without the check, the bundle uploaded meanwhile had its row moved but not its file.
        assert target.count("projects") == 0
        assert target.count("bundles") == 0
    finally:
        source.stop()

    # Once the source is left alone, the same move finishes, the new bundle and its file too.
    try:
        report = asyncio.run(_move(source, target, target.store))
        with source.db.read() as session:
            paths = set(session.scalars(select(Bundle.storage_path)))
    finally:
        source.db.dispose()
    assert report.rows["bundles"] == 3
    assert (report.objects_copied, report.objects_already_there) == (1, 2)
    stored = {item.key for item in asyncio.run(target.store.list_keys("ota/"))}
    assert stored == paths


async def _move(source: RunningServer, target: Target, store: Any) -> Any:
    return await move_install(
        source_db=source.db,
        source_store=source.store,
        target_db=target.db,
        target_store=store,
        jobs=DEFAULT_MOVE_JOBS,
    )


def test_a_source_with_no_project_is_refused(tmp_path: Path, target: Target) -> None:
    """A move run with the wrong KOOLBASE_OTA_DATA_DIR must not report success."""
    args, env = target.move_command(tmp_path / "wrong")
    moved = run_cli(tmp_path / "wrong", *args, env=env)
    assert moved.returncode == 1
    assert moved.stderr == "error: the source database holds no project: there is nothing to move\n"
    assert moved.stdout == ""


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_bundle_whose_file_is_missing_or_corrupt_stops_the_move(
    tmp_path: Path, target: Target, damage: str
) -> None:
    data_dir = tmp_path / "embedded"
    source = start_server(data_dir)
    try:
        project = new_project(source.db, "moving")
        with httpx.Client(base_url=source.base_url, timeout=30) as client:
            bundle = released(client, project)
        path = source.store.path_for(bundle["storage_path"])  # type: ignore[attr-defined]
    finally:
        source.stop()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"not the bundle that was uploaded")

    args, env = target.move_command(data_dir)
    moved = run_cli(data_dir, *args, env=env)
    assert moved.returncode == 1
    problem = "is missing from the source" if damage == "missing" else "does not match its checksum"
    assert moved.stderr == (
        f"error: bundle {bundle['id']} (production v1): its file {bundle['storage_path']}"
        f" {problem}; restore the file or delete the bundle, then run move again\n"
    )
    assert target.count("projects") == 0
