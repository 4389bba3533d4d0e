"""The deployment beyond one machine, for real: several `serve` processes on one PostgreSQL and
one S3 store, N processes racing on a new database, and `koolbase-ota move` from the embedded
default. (The API suite itself runs on both backend pairs through the `backend` fixture.)"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.script import ScriptDirectory

from koolbase_ota.db import alembic_config
from koolbase_ota.projects import service as projects
from tests.conftest import (
    eventually,
    make_zip,
    new_project,
    released,
    start_server,
    uploaded,
)
from tests.services import PostgresService, SeaweedService
from tests.test_cli import cli_env, run_cli
from tests.test_e2e import Server, auth, launch, serving, stop, wait_until_answering

CHECK = "/v1/sdk/ota/check"


@pytest.fixture
def shared_backends(postgres: PostgresService, seaweed: SeaweedService) -> dict[str, str]:
    """The environment of processes that share one fresh PostgreSQL database and S3 prefix."""
    return {
        "KOOLBASE_OTA_SECRET_KEY": "shared-" + "k" * 40,
        "KOOLBASE_OTA_DATABASE_URL": postgres.create_database(),
        "KOOLBASE_OTA_STORAGE_URL": f"s3://{seaweed.bucket}/{seaweed.unique_prefix()}",
        "KOOLBASE_OTA_S3_ENDPOINT": seaweed.endpoint,
        "KOOLBASE_OTA_S3_REGION": seaweed.region,
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
    }


@pytest.fixture
def two_servers(tmp_path: Path, shared_backends: dict[str, str]) -> Iterator[tuple[Server, Server]]:
    """Two real `serve` processes, each with its own data dir, on the same backends."""
    with ExitStack() as stack:
        first = stack.enter_context(serving(_data_dir(tmp_path, "a"), "a", env=shared_backends))
        second = stack.enter_context(serving(_data_dir(tmp_path, "b"), "b", env=shared_backends))
        yield first, second


def _data_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name / "data"
    path.parent.mkdir(parents=True)
    return path


def _project(servers: tuple[Server, Server]) -> dict[str, Any]:
    """The `default` project: exactly one of the two processes created it."""
    found = [s.credentials() for s in servers if (s.data_dir / "credentials.json").exists()]
    assert len(found) == 1
    return found[0]


def _upload(base_url: str, project: dict[str, Any], **fields: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/projects/{project['project_id']}/ota/upload",
        headers=auth(project["dashboard_token"]),
        files={"bundle": ("bundle.zip", make_zip(), "application/zip")},
        data=fields,
        timeout=30,
    )


def _check(base_url: str, key: str, version: int = 0) -> httpx.Response:
    return httpx.get(
        f"{base_url}/v1/sdk/ota/check",
        params={"channel": "production", "version": version},
        headers={"x-api-key": key},
        timeout=10,
    )


def test_two_processes_behave_as_one_server(two_servers: tuple[Server, Server]) -> None:
    a, b = two_servers
    project = _project(two_servers)
    key = project["public_keys"]["production"]
    path = f"/v1/projects/{project['project_id']}/ota"
    headers = auth(project["dashboard_token"])

    uploaded = _upload(a.base_url, project)
    assert uploaded.status_code == 201, uploaded.text
    bundle = uploaded.json()
    activated = httpx.post(f"{b.base_url}{path}/bundles/{bundle['id']}/activate", headers=headers)
    assert activated.status_code == 200, activated.text

    # Activated through B: A's check offers it, presigned by the store, not proxied by us.
    eventually(lambda: _check(a.base_url, key).json().get("has_update") is True, "activation")
    offer = _check(a.base_url, key).json()
    assert not offer["download_url"].startswith(a.base_url)
    body = httpx.get(offer["download_url"], timeout=10).content
    assert "sha256:" + hashlib.sha256(body).hexdigest() == offer["checksum"]

    # Mandatory set through A is seen by B's check.
    patched = httpx.patch(
        f"{a.base_url}{path}/bundles/{bundle['id']}", headers=headers, json={"mandatory": True}
    )
    assert patched.status_code == 200
    eventually(lambda: _check(b.base_url, key).json().get("mandatory") is True, "mandatory")

    # Deleted through B: A's check has nothing to offer, and the old URL stops working.
    deleted = httpx.delete(f"{b.base_url}{path}/bundles/{bundle['id']}", headers=headers)
    assert deleted.status_code == 204
    eventually(lambda: _check(a.base_url, key).json() == {"has_update": False}, "delete")
    assert httpx.get(offer["download_url"], timeout=10).status_code == 404


def test_processes_sign_alike_and_one_without_the_shared_key_says_so(
    two_servers: tuple[Server, Server], shared_backends: dict[str, str], tmp_path: Path
) -> None:
    """Processes with a data dir each and no `KOOLBASE_OTA_SECRET_KEY` made a key each, and
    signed the code-push answers each with its own, without a word (found by an operator's
    walk-through of DEPLOYMENT.md, helper-39)."""
    project = _project(two_servers)
    channel = httpx.post(
        f"{two_servers[0].base_url}/v1/projects/{project['project_id']}/ota/channels",
        headers=auth(project["dashboard_token"]),
        json={"name": "stable"},
    )
    assert channel.status_code == 201, channel.text
    bundle = _upload(two_servers[0].base_url, project, channel="stable").json()
    activated = httpx.post(
        f"{two_servers[0].base_url}/v1/projects/{project['project_id']}/ota/bundles/"
        f"{bundle['id']}/activate",
        headers=auth(project["dashboard_token"]),
    )
    assert activated.status_code == 200, activated.text
    key = {"x-api-key": project["public_keys"]["production"]}

    def signature(server: Server) -> str | None:
        url = f"{server.base_url}/v1/code-push/check?app_version=1.0.0&platform=ios"
        answer: dict[str, Any] = httpx.get(url, headers=key, timeout=10).json()
        found: str | None = answer.get("bundle", {}).get("signature")
        return found

    for server in two_servers:
        eventually(partial(lambda s: signature(s) is not None, server), "the release")
    assert signature(two_servers[0]) == signature(two_servers[1])
    for server in two_servers:
        assert "KOOLBASE_OTA_SECRET_KEY is not set" not in server.log()
    # One without the key: it serves, signing with a key of its own, and says so.
    alone = {name: value for name, value in shared_backends.items() if "SECRET_KEY" not in name}
    with serving(_data_dir(tmp_path, "c"), "c", env=alone) as third:
        assert signature(third) != signature(two_servers[0])
        assert "KOOLBASE_OTA_SECRET_KEY is not set" in third.log()
        assert str(third.data_dir.resolve() / "secret_key") in third.log()


def test_key_rotation_and_token_revocation_reach_every_process(
    two_servers: tuple[Server, Server], shared_backends: dict[str, str], tmp_path: Path
) -> None:
    a, b = two_servers
    project = _project(two_servers)
    cli_dir = _data_dir(tmp_path, "cli")
    env = cli_env(cli_dir, **shared_backends)
    old_key = project["public_keys"]["staging"]
    for server in two_servers:
        assert _check(server.base_url, old_key).status_code == 200

    rotated = run_cli(
        cli_dir,
        "key",
        "rotate",
        "--project",
        project["project_id"],
        "--environment",
        "staging",
        "--json",
        env=env,
    )
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.json()["public_key"]
    for url in (a.base_url, b.base_url):
        eventually(partial(_answers, _check, url, old_key, status=401), "rotation")
        assert _check(url, new_key).status_code == 200

    created = run_cli(
        cli_dir, "token", "create", "--project", project["project_id"], "--json", env=env
    )
    assert created.returncode == 0, created.stderr
    token = created.json()
    listing = f"/v1/projects/{project['project_id']}/ota/bundles"
    for url in (a.base_url, b.base_url):
        assert _list(url + listing, token["dashboard_token"]).status_code == 200
    revoked = run_cli(cli_dir, "token", "revoke", token["token_id"], env=env)
    assert revoked.returncode == 0, revoked.stderr
    for url in (a.base_url, b.base_url):
        probe = partial(_answers, _list, url + listing, token["dashboard_token"], status=401)
        eventually(probe, "revocation")


def _list(url: str, token: str) -> httpx.Response:
    return httpx.get(url, headers=auth(token), timeout=10)


def _answers(
    call: Callable[[str, str], httpx.Response], url: str, arg: str, *, status: int
) -> bool:
    return call(url, arg).status_code == status


def test_versions_and_the_one_active_rule_hold_across_processes(
    two_servers: tuple[Server, Server],
) -> None:
    project = _project(two_servers)
    urls = [server.base_url for server in two_servers] * 6
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(urls)) as pool:
        responses = list(pool.map(lambda url: _upload(url, project), urls))
    assert [r.status_code for r in responses] == [201] * len(urls), [r.text for r in responses]
    bundles = [r.json() for r in responses]
    assert sorted(b["version"] for b in bundles) == list(range(1, len(urls) + 1))

    headers = auth(project["dashboard_token"])
    path = f"/v1/projects/{project['project_id']}/ota/bundles"

    def activate(job: tuple[str, dict[str, Any]]) -> int:
        url, bundle = job
        return httpx.post(
            f"{url}{path}/{bundle['id']}/activate", headers=headers, timeout=30
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(urls)) as pool:
        statuses = list(pool.map(activate, zip(urls, bundles, strict=True)))
    assert statuses == [200] * len(urls)
    listed = httpx.get(two_servers[0].base_url + path, headers=headers).json()
    assert sum(bundle["active"] for bundle in listed) == 1


def test_processes_starting_at_once_on_a_new_database_do_not_race(
    tmp_path: Path, shared_backends: dict[str, str], postgres: PostgresService
) -> None:
    servers = [
        launch(_data_dir(tmp_path, name), name, env=shared_backends) for name in ("p1", "p2", "p3")
    ]
    try:
        for server in servers:
            wait_until_answering(server)
            assert httpx.get(server.base_url + "/readyz").status_code == 200
    finally:
        for server in servers:
            stop(server.process)
    assert sum((s.data_dir / "credentials.json").exists() for s in servers) == 1
    database = shared_backends["KOOLBASE_OTA_DATABASE_URL"].rsplit("/", 1)[1]
    with postgres.connect(database) as connection:
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        projects = connection.execute("SELECT name FROM projects").fetchall()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision == [(head,)]
    assert projects == [("default",)]


def test_move_from_the_embedded_default_changes_nothing_devices_see(
    tmp_path: Path, shared_backends: dict[str, str]
) -> None:
    data_dir = tmp_path / "embedded"
    embedded = start_server(data_dir)
    try:
        project = new_project(embedded.db, "moving")
        spare = new_project(embedded.db, "spare")
        with httpx.Client(base_url=embedded.base_url, timeout=30) as client:
            first = released(client, project, mandatory="true", release_notes="first")
            second = uploaded(client, project, channel="staging")
            doomed = uploaded(client, project)
            latest = released(client, project)
            assert (
                client.delete(
                    project.path(f"/bundles/{doomed['id']}"), headers=project.auth
                ).status_code
                == 204
            )
            before = client.get(project.path("/bundles"), headers=project.auth).json()
            offer_before = client.get(CHECK, params={"version": 0}, headers=project.key()).json()
        revoked, revoked_token = projects.create_token(embedded.db, project_id=project.id)
        projects.revoke_token(embedded.db, token_id=revoked.id)
        rotated_key = projects.rotate_key(embedded.db, project_id=project.id, environment="staging")
        trail_before = httpx.get(
            f"{embedded.base_url}/v1/projects/{project.id}/audit", headers=project.auth
        ).json()
    finally:
        embedded.stop()
    # The project, 4 uploads, 2 activations, a delete, a token made and revoked, a key rotated.
    assert len(trail_before) == 11
    assert [b["version"] for b in before] == [
        latest["version"],
        first["version"],
        second["version"],
    ]

    target = {
        "database_url": shared_backends["KOOLBASE_OTA_DATABASE_URL"],
        "storage_url": shared_backends["KOOLBASE_OTA_STORAGE_URL"],
    }
    env = cli_env(
        data_dir,
        AWS_ACCESS_KEY_ID=shared_backends["AWS_ACCESS_KEY_ID"],
        AWS_SECRET_ACCESS_KEY=shared_backends["AWS_SECRET_ACCESS_KEY"],
    )
    command = (
        "move",
        "--database-url",
        target["database_url"],
        "--storage-url",
        target["storage_url"],
        "--s3-endpoint",
        shared_backends["KOOLBASE_OTA_S3_ENDPOINT"],
        "--s3-region",
        shared_backends["KOOLBASE_OTA_S3_REGION"],
    )
    moved = run_cli(data_dir, *command, env=env)
    assert moved.returncode == 0, moved.stderr
    assert "copied 3 bundle files" in moved.stdout
    again = run_cli(data_dir, *command, env=env)
    assert again.returncode != 0
    assert "already holds projects" in again.stderr

    moved_server = start_server(
        tmp_path / "moved",
        backend="postgres-s3",
        s3_endpoint=shared_backends["KOOLBASE_OTA_S3_ENDPOINT"],
        s3_region=shared_backends["KOOLBASE_OTA_S3_REGION"],
        aws_access_key_id=shared_backends["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=shared_backends["AWS_SECRET_ACCESS_KEY"],
        **target,
    )
    try:
        with httpx.Client(base_url=moved_server.base_url, timeout=30) as client:
            # Same ids, versions, checksums, flags and timestamps; same token and keys.
            assert client.get(project.path("/bundles"), headers=project.auth).json() == before
            offer = client.get(CHECK, params={"version": 0}, headers=project.key()).json()
            assert {k: v for k, v in offer.items() if k != "download_url"} == {
                k: v for k, v in offer_before.items() if k != "download_url"
            }
            body = httpx.get(offer["download_url"], timeout=10).content
            assert "sha256:" + hashlib.sha256(body).hexdigest() == offer["checksum"]
            assert client.get(CHECK, headers=project.key("staging")).status_code == 401
            assert client.get(CHECK, headers={"x-api-key": rotated_key}).status_code == 200
            revoked_auth = {"Authorization": f"Bearer {revoked_token}"}
            assert client.get(project.path("/bundles"), headers=revoked_auth).status_code == 401
            assert client.get(spare.path("/bundles"), headers=spare.auth).json() == []
            # The audit trail moved with everything else.
            trail = client.get(f"/v1/projects/{project.id}/audit", headers=project.auth).json()
            assert trail == trail_before
            # The counter moved too: the deleted bundle's version is still never reused.
            assert uploaded(client, project)["version"] == doomed["version"] + 2
            # Mandatory history moved: a device on 0 is still forced by the first release.
            assert offer["mandatory"] is True
    finally:
        moved_server.stop()
