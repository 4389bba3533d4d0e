"""`koolbase-ota backup DIR`: a copy of the embedded default taken while it serves, that serves
the same answers once restored; refusals that leave nothing behind."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
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
    make_zip,
    new_project,
    released,
    start_server,
    upload,
    uploaded,
)
from tests.services import PostgresService, SeaweedService
from tests.test_cli import cli_env, run_cli
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


def test_bundles_deleted_while_files_are_copied_take_the_snapshot_again(
    embedded: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle deleted between the database's copy and its file's: the copy would hold a row
    without its file. The delete is real; only its moment is chosen (it cannot be hit on cue)."""
    project = new_project(embedded.db)
    with httpx.Client(base_url=embedded.base_url, timeout=30) as client:
        kept = uploaded(client, project)
        doomed = uploaded(client, project)
    snapshots = []
    taken = backup._snapshot

    def snapshot_then_delete(database: Path, copy: Path) -> None:
        taken(database, copy)
        snapshots.append(_rows(copy))
        if len(snapshots) == 1:
            deleted = httpx.delete(
                f"{embedded.base_url}{project.path('/bundles/' + doomed['id'])}",
                headers=project.auth,
                timeout=10,
            )
            assert deleted.status_code == 204

    monkeypatch.setattr(backup, "_snapshot", snapshot_then_delete)
    report = back_up(embedded.settings, tmp_path / "copy")
    assert len(snapshots) == 2
    assert len(snapshots[0]) == 2
    assert len(snapshots[1]) == 1
    assert (report.bundles, report.files, report.missing) == (1, 1, [])
    rows = _assert_whole(tmp_path / "copy")
    assert list(rows.values()) == [kept["checksum"]]


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


def test_postgresql_is_pointed_at_pg_dump(postgres: PostgresService, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "data", KOOLBASE_OTA_DATABASE_URL=postgres.create_database())
    result = run_cli(tmp_path / "data", "backup", str(tmp_path / "copy"), env=env)
    assert result.returncode == 1
    assert "back up PostgreSQL with pg_dump" in result.stderr
    assert not (tmp_path / "copy").exists()


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
    assert not (tmp_path / "typo" / "koolbase-ota.db").exists()
    assert not (tmp_path / "copy").exists()
