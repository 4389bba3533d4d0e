"""Backends that fail for real while bundles are uploaded and deleted: an unwritable bundle
directory, a frozen S3 server (SIGSTOP), a stopped PostgreSQL. Each request fails with a JSON
503 within the configured timeouts, and what it leaves is nothing, or a record that
`koolbase-ota gc` resolves once the backend is back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from koolbase_ota.bundles.models import Bundle
from koolbase_ota.sdk.cache import DOWNLOAD_ROUTE
from koolbase_ota.storage.signing import signed_path
from tests.api.test_bundles import pending_paths
from tests.api.test_upload import files_under
from tests.conftest import (
    RunningServer,
    assert_error,
    eventually,
    make_zip,
    new_project,
    released,
    start_server,
    upload,
    uploaded,
)
from tests.services import PostgresService, SeaweedService
from tests.test_cli import CliResult, run_cli


def s3_settings(seaweed: SeaweedService, **extra: Any) -> dict[str, Any]:
    return {
        "storage_url": f"s3://{seaweed.bucket}/{seaweed.unique_prefix()}",
        "s3_endpoint": seaweed.endpoint,
        "s3_region": seaweed.region,
        "aws_access_key_id": seaweed.access_key,
        "aws_secret_access_key": seaweed.secret_key,
        **extra,
    }


@contextlib.contextmanager
def running(data_dir: Path, **settings: Any) -> Iterator[tuple[RunningServer, httpx.Client]]:
    server = start_server(data_dir, **settings)
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            yield server, client
    finally:
        server.stop()


def rows(server: RunningServer) -> list[Bundle]:
    with server.db.read() as session:
        return list(session.scalars(select(Bundle)))


def gc(server: RunningServer, *options: str) -> CliResult:
    """`koolbase-ota gc` as an operator runs it, against the server's backends."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith("KOOLBASE_OTA_")
    }
    env |= server.environment()
    # With an S3 store this used to abort (SIGABRT) now and then at interpreter exit, after
    # the report was printed; `cli.run` now exits without Python's finalisation.
    return run_cli(server.settings.data_dir, "gc", *options, env=env)


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[str]:
    """Make `directory` refuse new entries, for real; yields how it was done.

    chmod does not stop root, and the suite runs as root in CI; there the directory is made
    immutable (`chattr +i`, which binds root too). Where neither works (a filesystem without
    the flag), the directory is replaced by a plain file, which refuses entries just the same.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield "chmod 0500"
        finally:
            directory.chmod(0o700)
        return
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(directory)], check=False).returncode == 0:
        try:
            yield "chattr +i"
        finally:
            subprocess.run([chattr, "-i", str(directory)], check=True)
        return
    directory.rmdir()
    directory.write_bytes(b"not a directory")
    try:
        yield "replaced by a file"
    finally:
        directory.unlink()
        directory.mkdir()


def test_an_upload_into_an_unwritable_bundle_directory_is_503_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    with running(tmp_path) as (server, client):
        project = new_project(server.db)
        with unwritable(server.settings.data_dir / "bundles" / "ota"):
            response = upload(client, project, make_zip())
        assert_error(response, 503, "storage_unavailable")
        assert rows(server) == []
        assert server.stored_keys() == set()
        assert pending_paths(server) == {}
        assert files_under(server.settings.data_dir / "tmp") == set()
        # Once the directory is writable again, uploads work; the failed one took no file,
        # only its version number (numbers are never given out twice).
        assert uploaded(client, project)["version"] == 2


def test_an_upload_while_the_store_is_frozen_is_503_and_gc_resolves_its_record(
    tmp_path: Path, seaweed: SeaweedService
) -> None:
    with running(tmp_path, **s3_settings(seaweed, storage_timeout_seconds=1)) as (server, client):
        project = new_project(server.db)
        seaweed.pause()
        try:
            response = upload(client, project, make_zip())
        finally:
            seaweed.resume()
        assert_error(response, 503, "storage_unavailable")
        assert rows(server) == []
        assert files_under(server.settings.data_dir / "tmp") == set()
        # A PUT that timed out may still land when the store wakes up: its key stays recorded,
        # and gc removes whatever is there.
        key = f"ota/{project.id}/production/v1.zip"
        assert pending_paths(server) == {key: "upload"}
        result = gc(server, "--grace-seconds", "0")
        assert result.returncode == 0, result.stdout + result.stderr
        assert pending_paths(server) == {}
        assert server.stored_keys() == set()
        assert uploaded(client, project)["version"] == 2


def test_a_delete_while_the_store_is_frozen_is_finished_by_gc_once_it_is_back(
    tmp_path: Path, seaweed: SeaweedService
) -> None:
    with running(tmp_path, **s3_settings(seaweed, storage_timeout_seconds=1)) as (server, client):
        project = new_project(server.db)
        bundle = released(client, project)
        kept = uploaded(client, project)
        key = bundle["storage_path"]
        seaweed.pause()
        try:
            response = client.delete(project.path(f"/bundles/{bundle['id']}"), headers=project.auth)
        finally:
            seaweed.resume()
        assert response.status_code == 204, response.text
        assert [row.id.hex for row in rows(server)] == [kept["id"].replace("-", "")]
        # The DELETE sent to the frozen store waits in its socket and may still land when the
        # store wakes up, or not: the object's presence says nothing. The record is what counts.
        assert pending_paths(server) == {key: "delete"}
        check = client.get("/v1/sdk/ota/check", headers=project.key())
        assert check.json() == {"has_update": False}

        result = gc(server)  # the default grace: a recorded delete goes at once
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"removed  {key}" in result.stdout
        assert not server.object_exists(key)
        assert pending_paths(server) == {}

        # A row whose file is gone is reported (and left for a person to look at).
        asyncio.run(server.store.delete(kept["storage_path"]))
        result = gc(server, "--json")
        assert result.returncode == 1
        assert '"missing": [' in result.stdout
        assert kept["storage_path"] in result.stdout
        assert [row.storage_path for row in rows(server)] == [kept["storage_path"]]


def test_a_copy_to_a_frozen_store_is_503_and_gc_resolves_its_record(
    tmp_path: Path, seaweed: SeaweedService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SeaweedFS has no copy-if-absent, so a promote looks for the target first, then copies.
    The store is frozen between the two (the look is wrapped to freeze it when it returns):
    the copy is sent to a store that holds it and may carry it out when it wakes up."""
    with running(tmp_path, **s3_settings(seaweed, storage_timeout_seconds=1)) as (server, client):
        project = new_project(server.db)
        bundle = released(client, project)
        key = f"ota/{project.id}/staging/v1.zip"
        store = server.store
        look = store.exists

        async def look_then_freeze(looked_up: str) -> bool:
            found = await look(looked_up)
            if looked_up == key:
                seaweed.pause()
            return found

        monkeypatch.setattr(store, "exists", look_then_freeze)
        try:
            response = client.post(
                project.path(f"/bundles/{bundle['id']}/promote"),
                headers=project.auth,
                json={"channel": "staging"},
            )
        finally:
            seaweed.resume()
            monkeypatch.undo()
        assert_error(response, 503, "storage_unavailable")
        assert [row.channel for row in rows(server)] == ["production"]
        # The copy that timed out may still land: its key stays recorded, and gc removes
        # whatever is there.
        assert pending_paths(server) == {key: "upload"}
        result = gc(server, "--grace-seconds", "0")
        assert result.returncode == 0, result.stdout + result.stderr
        assert pending_paths(server) == {}
        assert server.stored_keys() == {bundle["storage_path"]}


@pytest.fixture
def own_postgres() -> Iterator[PostgresService]:
    """A PostgreSQL of this test's own, to stop without disturbing the rest of the suite."""
    with PostgresService() as service:
        yield service


def test_an_upload_while_postgres_is_stopped_is_503_and_leaves_nothing(
    tmp_path: Path, own_postgres: PostgresService
) -> None:
    settings = {"database_url": own_postgres.create_database(), "database_timeout_seconds": 2}
    with running(tmp_path, **settings) as (server, client):
        project = new_project(server.db)
        own_postgres.stop()
        try:
            response = upload(client, project, make_zip())
        finally:
            own_postgres.start()
        assert_error(response, 503, "database_unavailable")
        assert server.stored_keys() == set()
        assert files_under(server.settings.data_dir / "tmp") == set()
        assert rows(server) == []
        assert pending_paths(server) == {}
        assert uploaded(client, project)["version"] == 1


def test_postgres_stopping_between_storing_and_recording_leaves_only_a_record_for_gc(
    tmp_path: Path, own_postgres: PostgresService, seaweed: SeaweedService
) -> None:
    """The store is frozen so that the upload waits after taking its version, PostgreSQL is
    stopped, then the store is thawed: the file lands but its row cannot be written."""
    settings = s3_settings(
        seaweed,
        database_url=own_postgres.create_database(),
        database_timeout_seconds=2,
        storage_timeout_seconds=20,
    )
    with running(tmp_path, **settings) as (server, client):
        project = new_project(server.db)
        key = f"ota/{project.id}/production/v1.zip"
        answers: list[httpx.Response] = []
        seaweed.pause()
        try:
            uploading = threading.Thread(
                target=lambda: answers.append(upload(client, project, make_zip()))
            )
            uploading.start()
            eventually(lambda: key in pending_paths(server), "the version taken", within=10)
            server.db.dispose()
            own_postgres.stop()
        finally:
            seaweed.resume()
        uploading.join(timeout=60)
        own_postgres.start()
        (response,) = answers
        assert_error(response, 503, "database_unavailable")
        assert rows(server) == []
        # The file was removed again; only the record could not be cleared with the database
        # down, and gc clears it.
        assert server.stored_keys() == set()
        assert pending_paths(server) == {key: "upload"}
        result = gc(server, "--grace-seconds", "0")
        assert result.returncode == 0, result.stdout + result.stderr
        assert pending_paths(server) == {}
        assert server.stored_keys() == set()
        assert uploaded(client, project)["version"] == 2


def test_a_frozen_postgres_fails_requests_with_503_instead_of_holding_them(
    tmp_path: Path, own_postgres: PostgresService
) -> None:
    """Frozen with SIGSTOP: its sockets stay open and its kernel takes every byte, but nothing
    answers, as a host cut off by a network that drops its packets, or a pooler that queues.
    The statement timeout is the server's own, so a request on a connection already open
    waited until the database came back: `/readyz`, the dashboard and cold checks hung."""
    settings = {"database_url": own_postgres.create_database(), "database_timeout_seconds": 1}
    with running(tmp_path, **settings) as (server, client):
        project = new_project(server.db)
        released(client, project)
        check = "/v1/sdk/ota/check?version=0"
        # Open connections in every pool, for the requests below to hang on.
        for _ in range(3):
            assert client.get(project.path("/bundles"), headers=project.auth).status_code == 200
            assert client.get(check, headers=project.key()).status_code == 200
            assert client.get("/readyz").status_code == 200
        own_postgres.pause()
        try:
            ready = client.get("/readyz", timeout=30)
            listed = client.get(project.path("/bundles"), headers=project.auth, timeout=30)
            cold = client.get(check + "&channel=staging", headers=project.key(), timeout=30)
            warm = client.get(check, headers=project.key(), timeout=30)
        finally:
            own_postgres.resume()
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "unavailable"
        assert_error(listed, 503, "database_unavailable")
        assert_error(cold, 503, "database_unavailable")
        assert warm.status_code == 200
        assert warm.json()["version"] == 1
        # The connections given up were closed; new ones serve once it is back.
        eventually(lambda: client.get("/readyz").status_code == 200, "ready again", within=30)
        assert client.get(project.path("/bundles"), headers=project.auth).status_code == 200
        assert client.get(check + "&channel=staging", headers=project.key()).status_code == 200


def checks_at_once(client: httpx.Client, check: str, keys: list[str]) -> list[httpx.Response]:
    """`check` with each of `keys`, all at once."""
    with ThreadPoolExecutor(len(keys)) as pool:
        return list(
            pool.map(lambda key: client.get(check, headers={"x-api-key": key}, timeout=15), keys)
        )


def test_a_check_waits_for_a_frozen_postgres_at_most_its_timeout_queue_included(
    tmp_path: Path, own_postgres: PostgresService
) -> None:
    """Cold checks of 40 different keys at once: the 4 lookup threads each take a lookup, whose
    wait for the frozen database is bounded, and the rest queue. Each check waited for the
    lookups ahead of it in turn (10 rounds of 3 s here, and of 12 s at the default timeout,
    past the SDK's own 10 s); it now answers 503 once the database timeout has passed."""
    settings = {"database_url": own_postgres.create_database(), "database_timeout_seconds": 1}
    keys = [f"pk_live_{n:024d}" for n in range(40)]
    with running(tmp_path, **settings) as (server, client):
        project = new_project(server.db)
        released(client, project)
        check = "/v1/sdk/ota/check?version=0"
        assert client.get(check, headers={"x-api-key": keys[0]}).status_code == 401
        assert client.get(check, headers=project.key()).status_code == 200  # cached
        own_postgres.pause()
        try:
            answers = checks_at_once(client, check, keys[1:])
            warm = client.get(check, headers=project.key(), timeout=15)
        finally:
            own_postgres.resume()
        for answer in answers:
            assert_error(answer, 503, "database_unavailable")
        assert warm.status_code == 200
        # Unknown keys are still learnt once the database answers.
        eventually(
            lambda: client.get(check, headers={"x-api-key": keys[1]}).status_code == 401,
            "the key looked up again",
            within=60,
        )


def test_readiness_probes_at_once_each_answer_503_within_the_timeout(
    tmp_path: Path, own_postgres: PostgresService
) -> None:
    """Load balancers and orchestrators probe `/readyz` side by side. On a frozen database the
    probes queued for the one thread `/readyz` reads with, each waiting out the read before it:
    the eighth of eight answered after eight waits (19 s at a 1 s timeout, 96 s at the
    default). They share the read in flight now, and each answers 503 after the timeout."""
    settings = {"database_url": own_postgres.create_database(), "database_timeout_seconds": 1}
    with running(tmp_path, **settings) as (_server, client):
        assert client.get("/readyz").status_code == 200
        own_postgres.pause()
        try:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda _n: client.get("/readyz", timeout=8), range(8)))
        finally:
            own_postgres.resume()
        for answer in answers:
            assert answer.status_code == 503
            assert answer.json()["checks"]["database"] == "unavailable"
        eventually(lambda: client.get("/readyz").status_code == 200, "ready again", within=30)


def metric(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` with these labels in a `/metrics` answer."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def lookups(client: httpx.Client, kind: str) -> dict[str, float]:
    """`koolbase_ota_check_lookups_total` of `kind` by result, from one `/metrics` answer."""
    exposition = client.get("/metrics").text
    return {
        result: metric(exposition, "koolbase_ota_check_lookups_total", kind=kind, result=result)
        for result in ("loaded", "failed", "abandoned")
    }


def test_lookups_every_check_gave_up_on_are_dropped_not_run_later(
    tmp_path: Path, own_postgres: PostgresService
) -> None:
    """Cold checks of 40 keys on a frozen database answer 503 after the timeout; the lookups
    of the 36 that had no thread yet stayed queued, each to take its database timeout in turn
    (a flood of invented keys piled them up for as long as the outage lasted), and then all
    ran at once when it came back. Now a lookup nobody waits for any more is dropped."""
    settings = {"database_url": own_postgres.create_database(), "database_timeout_seconds": 1}
    keys = [f"pk_live_{n:024d}" for n in range(40)]
    with running(tmp_path, **settings) as (_server, client):
        check = "/v1/sdk/ota/check?version=0"
        assert client.get(check, headers={"x-api-key": keys[0]}).status_code == 401
        before = lookups(client, "key")
        own_postgres.pause()
        try:
            answers = checks_at_once(client, check, keys[1:])
            during = lookups(client, "key")
        finally:
            own_postgres.resume()
        for answer in answers:
            assert_error(answer, 503, "database_unavailable")
        dropped = during["abandoned"] - before["abandoned"]
        ran = sum(during.values()) - sum(before.values()) - dropped
        # The 4 lookup threads took 4; a thread freed by a failed lookup may take one more
        # before its checks give up. The rest never reach the database.
        assert dropped >= len(answers) - 8
        assert dropped + ran <= len(answers)
        # Each key is looked up again by its next check.
        eventually(
            lambda: client.get(check, headers={"x-api-key": keys[1]}).status_code == 401,
            "the key looked up again",
            within=30,
        )
        after = lookups(client, "key")
        assert after["abandoned"] == during["abandoned"]


def test_cold_downloads_on_a_frozen_postgres_answer_503_after_one_wait(
    tmp_path: Path, own_postgres: PostgresService
) -> None:
    """A download whose bundle's checksum this process has not read yet looks it up on the
    checks' lookup threads. On a frozen database it waited for the lookups queued ahead of it
    without a bound, and a failed lookup was made again by the route it fell back to: 11 at
    once took over 6 s each at a 1 s timeout. Each now answers 503 after the timeout, as a
    cold check does, and downloads whose checksum is cached go on."""
    settings = {"database_url": own_postgres.create_database(), "database_timeout_seconds": 1}
    with running(tmp_path, **settings) as (server, client):
        project = new_project(server.db)
        stored = [uploaded(client, project)["storage_path"] for _ in range(12)]
        secret = server.settings.secret_key
        urls = [signed_path(secret, path, ttl_seconds=600) for path in stored]
        assert client.get(urls[0]).status_code == 200  # its checksum is cached now
        own_postgres.pause()
        try:
            with ThreadPoolExecutor(len(urls)) as pool:
                answers = list(pool.map(lambda url: client.get(url, timeout=6), urls[1:]))
            warm = client.get(urls[0], timeout=6)
        finally:
            own_postgres.resume()
        for answer in answers:
            assert_error(answer, 503, "database_unavailable")
        assert warm.status_code == 200
        assert len(warm.content) == int(warm.headers["content-length"])
        eventually(lambda: client.get(urls[1]).status_code == 200, "downloads again", within=30)


def download_latency(client: httpx.Client) -> tuple[float, float]:
    """(count, sum) of the download route's GET latency, from one `/metrics` answer."""
    exposition = client.get("/metrics").text
    return (
        metric(
            exposition,
            "koolbase_ota_request_duration_seconds_count",
            route=DOWNLOAD_ROUTE,
            method="GET",
        ),
        metric(
            exposition,
            "koolbase_ota_request_duration_seconds_sum",
            route=DOWNLOAD_ROUTE,
            method="GET",
        ),
    )


def test_a_download_refused_in_front_of_the_framework_is_timed_from_its_arrival(
    tmp_path: Path, own_postgres: PostgresService
) -> None:
    """A download's lookup happens in front of the framework, and a refusal is raised by the
    route, whose metrics started their clock only then: a 503 after the database timeout was
    recorded as taking 25 ms (found by review, helper-37)."""
    settings = {"database_url": own_postgres.create_database(), "database_timeout_seconds": 1}
    with running(tmp_path, **settings) as (server, client):
        project = new_project(server.db)
        stored = uploaded(client, project)["storage_path"]
        url = signed_path(server.settings.secret_key, stored, ttl_seconds=600)
        before = download_latency(client)
        own_postgres.pause()
        try:
            answer = client.get(url, timeout=10)
        finally:
            own_postgres.resume()
        assert_error(answer, 503, "database_unavailable")
        count, total = download_latency(client)
        assert count - before[0] == 1  # counted once
        assert total - before[1] >= 0.9  # the database timeout, waited in front
