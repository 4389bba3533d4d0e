"""`koolbase-ota backup DIR`: a copy of the embedded default taken while it serves, that serves
the same answers once restored; refusals that leave nothing behind."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from koolbase_ota import backup
from koolbase_ota.backup import back_up
from koolbase_ota.config import Settings
from tests.conftest import (
    Project,
    RunningServer,
    eventually,
    make_zip,
    new_project,
    released,
    start_server,
    upload,
    uploaded,
)
from tests.services import SeaweedService
from tests.test_cli import cli_env, run_cli, terminated_once
from tests.test_e2e import auth, serving

CHECK = "/v1/sdk/ota/check"


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[RunningServer]:
    server = start_server(tmp_path / "data")
    try:
        yield server
    finally:
        server.stop()


def _rows(database: Path) -> dict[str, str]:
    with sqlite3.connect(database) as connection:
        return dict(connection.execute("SELECT storage_path, checksum FROM bundles").fetchall())


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_whole(directory: Path) -> dict[str, str]:
    """Every bundle row of the copy has its file, matching its checksum; no other file."""
    rows = _rows(directory / "koolbase-ota.db")
    files = {
        path.relative_to(directory / "bundles").as_posix()
        for path in (directory / "bundles").rglob("*")
        if path.is_file()
    }
    assert files == set(rows)
    for storage_path, checksum in rows.items():
        assert _sha256(directory / "bundles" / storage_path) == checksum
    return rows


def _backup(server: RunningServer, directory: Path, *args: str) -> Any:
    """`koolbase-ota backup DIR` on the server's data dir (its secret key in a file there)."""
    return run_cli(server.settings.data_dir, "backup", str(directory), *args)


def test_a_backup_taken_while_serving_serves_the_same_answers_once_restored(
    embedded: RunningServer, tmp_path: Path
) -> None:
    project = new_project(embedded.db)
    with httpx.Client(base_url=embedded.base_url, timeout=30) as client:
        released(client, project)
        second = released(client, project, release_notes="the second")
        uploaded(client, project, channel="staging")
        before = client.get(CHECK, headers=project.key()).json()
    assert before["has_update"] is True
    assert before["version"] == second["version"]

    result = _backup(embedded, tmp_path / "nightly")
    assert result.returncode == 0, result.stderr
    assert "backed up 1 project and 3 bundles" in result.stdout
    assert "(3 bundle files, each matching its checksum; with secret_key)" in result.stdout
    copy = tmp_path / "nightly"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o700
    assert stat.S_IMODE((copy / "secret_key").stat().st_mode) == 0o600
    assert stat.S_IMODE((copy / "koolbase-ota.db").stat().st_mode) == 0o600
    assert len(_assert_whole(copy)) == 3
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    embedded.stop()

    # Restored: the same answer (the URL aside, signed anew), the same bytes, the same token.
    with serving(copy, "restored") as restored:
        answer = httpx.get(restored.base_url + CHECK, headers=project.key(), timeout=10).json()
        assert {k: v for k, v in answer.items() if k != "download_url"} == {
            k: v for k, v in before.items() if k != "download_url"
        }
        bundle = httpx.get(answer["download_url"], timeout=10)
        assert bundle.status_code == 200
        assert "sha256:" + hashlib.sha256(bundle.content).hexdigest() == answer["checksum"]
        listed = httpx.get(
            f"{restored.base_url}/v1/projects/{project.id}/ota/bundles",
            headers=auth(project.token),
            timeout=10,
        )
        assert listed.status_code == 200
        assert len(listed.json()) == 3


@pytest.mark.parametrize("filesystem", ["same", "other"])
def test_bundles_deleted_after_the_snapshot_take_it_again(
    embedded: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filesystem: str
) -> None:
    """A bundle deleted between the database's copy and its file's: the copy would hold a row
    without its file. The delete is real; only its moment is chosen (it cannot be hit on cue).

    Every file is linked before any is read or copied (into the copy, or on another
    filesystem into a staging directory beside the store), so the window is milliseconds:
    copying file by file, every snapshot, gave up under light activity on a GB of bundles
    (found by review, helper-43)."""
    where = tmp_path if filesystem == "same" else _other_filesystem(tmp_path)
    if where is None:
        pytest.skip("no second filesystem (/dev/shm) on this machine")
    project = new_project(embedded.db)
    with httpx.Client(base_url=embedded.base_url, timeout=30) as client:
        kept = uploaded(client, project)
        doomed = uploaded(client, project)
    store_root = embedded.settings.data_dir / "bundles"
    staged: list[bool] = []
    taken = backup._snapshot

    def snapshot_then_delete(database: Path, copy: Path) -> None:
        taken(database, copy)
        staged.append(any(n.startswith(backup.STAGING_PREFIX) for n in os.listdir(store_root)))
        # On another filesystem, the first link fails (EXDEV) and staging starts over with a
        # snapshot of its own: the delete follows that one.
        if staged.count(filesystem == "other") == 1 and staged[-1] == (filesystem == "other"):
            deleted = httpx.delete(
                f"{embedded.base_url}{project.path('/bundles/' + doomed['id'])}",
                headers=project.auth,
                timeout=10,
            )
            assert deleted.status_code == 204

    monkeypatch.setattr(backup, "_snapshot", snapshot_then_delete)
    try:
        report = back_up(embedded.settings, where / "copy")
        assert report.snapshots == (2 if filesystem == "same" else 3)
        assert (report.bundles, report.files, report.missing) == (1, 1, [])
        rows = _assert_whole(where / "copy")
        assert list(rows.values()) == [kept["checksum"]]
        (file,) = (where / "copy" / "bundles").rglob("*.zip")
        # Linked where it can be (the store's and the copy's), else copied from a staging
        # directory, which is gone.
        assert staged == ([False, False] if filesystem == "same" else [False, True, True])
        assert file.stat().st_nlink == (2 if filesystem == "same" else 1)
        assert not [n for n in os.listdir(store_root) if n.startswith(backup.STAGING_PREFIX)]
    finally:
        if where != tmp_path:
            shutil.rmtree(where, ignore_errors=True)


def test_backups_while_bundles_come_and_go_are_each_whole(
    embedded: RunningServer, tmp_path: Path
) -> None:
    project = new_project(embedded.db)
    stop = threading.Event()
    errors: list[str] = []

    def churn() -> None:
        with httpx.Client(base_url=embedded.base_url, timeout=30) as client:
            while not stop.is_set():
                made = upload(client, project, make_zip({"n.json": os.urandom(8).hex()}))
                if made.status_code != 201:
                    errors.append(made.text)
                    return
                gone = client.delete(
                    project.path(f"/bundles/{made.json()['id']}"), headers=project.auth
                )
                if gone.status_code != 204:
                    errors.append(gone.text)
                    return
                upload(client, project)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for n in range(4):
            report = back_up(embedded.settings, tmp_path / f"copy{n}")
            assert report.missing == []
            assert len(_assert_whole(tmp_path / f"copy{n}")) == report.bundles == report.files
    finally:
        stop.set()
        worker.join()
    assert not errors


def test_a_bundle_file_missing_in_the_install_is_reported_and_the_rest_kept(
    embedded: RunningServer, tmp_path: Path
) -> None:
    project = new_project(embedded.db)
    database = embedded.settings.data_dir / "koolbase-ota.db"
    with httpx.Client(base_url=embedded.base_url, timeout=30) as client:
        uploaded(client, project)
        first = set(_rows(database))
        uploaded(client, project)
    (storage_path,) = set(_rows(database)) - first
    (embedded.settings.data_dir / "bundles" / storage_path).unlink()
    result = _backup(embedded, tmp_path / "copy", "--json")
    assert result.returncode == 1, result.stderr
    report = result.json()
    assert report["missing"] == [storage_path]
    assert (report["bundles"], report["files"]) == (2, 1)
    assert (tmp_path / "copy" / "koolbase-ota.db").is_file()


def test_a_bundle_file_that_does_not_match_its_checksum_is_refused(
    embedded: RunningServer, tmp_path: Path
) -> None:
    project = new_project(embedded.db)
    with httpx.Client(base_url=embedded.base_url, timeout=30) as client:
        uploaded(client, project)
    (storage_path,) = _rows(embedded.settings.data_dir / "koolbase-ota.db")
    (embedded.settings.data_dir / "bundles" / storage_path).write_bytes(b"rotten")
    result = _backup(embedded, tmp_path / "copy")
    assert result.returncode == 1
    assert result.stderr == (
        f"error: the file of the bundle at {storage_path} does not match its checksum in the"
        " install; restore the file or delete the bundle, then run backup again\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("where", ["exists", "inside", "no-parent"])
def test_a_directory_that_cannot_be_the_copy_is_refused(
    embedded: RunningServer, tmp_path: Path, where: str
) -> None:
    data_dir = embedded.settings.data_dir
    target = {
        "exists": tmp_path / "data",
        "inside": data_dir / "backup",
        "no-parent": tmp_path / "nowhere" / "backup",
    }[where]
    before = sorted(p.name for p in data_dir.iterdir())
    result = _backup(embedded, target)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    assert sorted(p.name for p in data_dir.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_postgresql_is_pointed_at_pg_dump(tmp_path: Path) -> None:
    """Refused before any connection; and no data dir or key made where none was."""
    url = "postgresql://ota:pw@127.0.0.1:1/ota"
    env = cli_env(tmp_path / "data", KOOLBASE_OTA_DATABASE_URL=url)
    result = run_cli(tmp_path / "data", "backup", str(tmp_path / "copy"), env=env)
    assert result.returncode == 1
    assert "back up PostgreSQL with pg_dump" in result.stderr
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["inside", "in-its-place"])
def test_a_copy_inside_the_bundle_store_is_refused(tmp_path: Path, where: str) -> None:
    """`gc` would take it for orphaned files and remove it (found by review, helper-43); in the
    place of a store not made yet, the server would keep its bundles in the copy."""
    store = tmp_path / "store"
    env = cli_env(tmp_path / "data", KOOLBASE_OTA_STORAGE_URL=store.as_uri())
    assert run_cli(tmp_path / "data", "db", "upgrade", env=env).returncode == 0
    if where == "inside":
        (store / "ota").mkdir(parents=True)
    target = store / "ota" / "copy" if where == "inside" else store
    result = run_cli(tmp_path / "data", "backup", str(target), env=env)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {target} is inside the bundle store; name a directory outside it\n"
    )


def test_bundles_in_s3_stay_there_and_the_database_is_copied(
    seaweed: SeaweedService, tmp_path: Path
) -> None:
    server = start_server(
        tmp_path / "data",
        storage_url=f"s3://{seaweed.bucket}/{seaweed.unique_prefix()}",
        s3_endpoint=seaweed.endpoint,
        s3_region=seaweed.region,
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key=seaweed.secret_key,
    )
    try:
        project: Project = new_project(server.db)
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            uploaded(client, project)
        result = run_cli(
            server.settings.data_dir,
            "backup",
            str(tmp_path / "copy"),
            env=cli_env(server.settings.data_dir, **server.environment()),
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert "1 bundle to" in result.stdout
    assert "the bundle files stay in the S3 store" in result.stdout
    assert "KOOLBASE_OTA_DATABASE_URL unset" in result.stdout
    assert len(_rows(tmp_path / "copy" / "koolbase-ota.db")) == 1
    assert not (tmp_path / "copy" / "bundles").exists()


def test_an_install_without_projects_backs_up_empty(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data").resolved()
    run_cli(settings.data_dir, "db", "upgrade")
    report = back_up(settings, tmp_path / "copy")
    assert (report.projects, report.bundles, report.files) == (0, 0, 0)
    assert _rows(tmp_path / "copy" / "koolbase-ota.db") == {}


def test_the_database_is_copied_at_its_revision_not_migrated_first(tmp_path: Path) -> None:
    """A backup is what one takes before an upgrade (every other command migrates first), so
    even a schema this version does not know is copied as it is."""
    data_dir = tmp_path / "data data"  # a space: the database is opened by a file: URI
    run_cli(data_dir, "db", "upgrade")
    with sqlite3.connect(data_dir / "koolbase-ota.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099'")
    assert run_cli(data_dir, "project", "list").returncode == 1
    result = run_cli(data_dir, "backup", str(tmp_path / "copy"))
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "copy" / "koolbase-ota.db") as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
            ("0099",)
        ]


def test_a_data_dir_without_a_database_is_refused_and_left_without_one(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "typo", "backup", str(tmp_path / "copy"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: there is no database at ")
    # Neither the directory nor a key made (every other command makes both).
    assert sorted(tmp_path.iterdir()) == []


def _other_filesystem(path: Path) -> Path | None:
    """A directory for a test on another filesystem than `path`'s, if the machine has one."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != path.stat().st_dev:
        return Path(tempfile.mkdtemp(prefix="koolbase-backup-", dir=shm))
    return None


def test_a_staging_directory_a_killed_backup_left_is_removed_by_the_next(
    embedded: RunningServer, tmp_path: Path
) -> None:
    """Its links kept every bundle deleted since on disk, and nothing removed it (found by
    review, helper-44). One a running backup holds (locked) is left alone."""
    elsewhere = _other_filesystem(tmp_path)
    if elsewhere is None:
        pytest.skip("no second filesystem (/dev/shm) on this machine")
    project = new_project(embedded.db)
    with httpx.Client(base_url=embedded.base_url, timeout=30) as client:
        uploaded(client, project)
    store_root = embedded.settings.data_dir / "bundles"
    left = store_root / f"{backup.STAGING_PREFIX}killed"
    held = store_root / f"{backup.STAGING_PREFIX}held"
    for staging in (left, held):
        (staging / "ota").mkdir(parents=True)
        (staging / "ota" / "v1.zip").write_bytes(b"a link, once")
        os.utime(staging, (time.time() - 3600, time.time() - 3600))
    try:
        with open(held / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            report = back_up(embedded.settings, elsewhere / "copy")
        assert (report.bundles, report.files) == (1, 1)
        assert not left.exists()
        assert (held / "ota" / "v1.zip").exists()
        staged = [n for n in os.listdir(store_root) if n.startswith(backup.STAGING_PREFIX)]
        assert staged == [held.name]
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_sigterm_removes_the_partial_copy(embedded: RunningServer, tmp_path: Path) -> None:
    """`timeout`, `systemctl stop` and `docker stop` send SIGTERM: the partial copy (up to
    every bundle's size) stayed. The copy is held where it reads a bundle file: a FIFO in
    its place blocks the read until the signal."""
    project = new_project(embedded.db)
    with httpx.Client(base_url=embedded.base_url, timeout=30) as client:
        uploaded(client, project)
    (storage_path,) = _rows(embedded.settings.data_dir / "koolbase-ota.db")
    bundle_file = embedded.settings.data_dir / "bundles" / storage_path
    bundle_file.unlink()
    os.mkfifo(bundle_file)

    def reading_the_fifo(_copying: subprocess.Popen[bytes]) -> None:
        def held() -> bool:
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(".copy.partial-")]
            return any(path.is_fifo() for p in partial for path in p.rglob("*.zip"))

        eventually(held, "the copy under way", within=30)
        time.sleep(0.5)  # from linking it to opening it

    returncode, stderr = terminated_once(
        cli_env(embedded.settings.data_dir), ["backup", str(tmp_path / "copy")], reading_the_fifo
    )
    assert returncode == 128 + signal.SIGTERM, stderr
    assert stderr == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
