"""A user's path end to end: the real `koolbase-ota serve` process, the real CLI, plain HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_upload import read_http_response
from tests.conftest import BUNDLE_FIELDS, OFFER_FIELDS, eventually
from tests.test_cli import CONSOLE_SCRIPT, cli_env, mode, query, run_cli

#: Generous: on a loaded 2-core machine (a test run beside other work) a start took over 20 s.
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 15
CREDENTIALS_FILE = "credentials.json"


@dataclass
class Server:
    """A running `koolbase-ota serve` process and where its log (stderr) goes."""

    process: subprocess.Popen[bytes]
    base_url: str
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def credentials(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.data_dir / CREDENTIALS_FILE).read_text())
        return data


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_answering(server: Server) -> None:
    """Poll until the server answers HTTP, failing with its log if it dies or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"serve exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(server.base_url + "/openapi.json", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"serve did not answer within {START_TIMEOUT_SECONDS} s:\n{server.log()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """End the serve process we started, by its PID, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch(
    data_dir: Path,
    log_name: str,
    *options: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    public_url: bool = True,
) -> Server:
    """Start `koolbase-ota serve` on a free port of 127.0.0.1 without waiting for it.

    `env` adds settings (a PostgreSQL URL, an S3 store) to the process's environment;
    `preexec_fn` runs in the child before `serve` starts; without `public_url`, the
    environment does not set `KOOLBASE_OTA_PUBLIC_URL`.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = cli_env(data_dir, **(env or {}))
    if public_url:
        env["KOOLBASE_OTA_PUBLIC_URL"] = base_url
    log_path = data_dir.parent / f"{log_name}.stderr.log"
    command = [str(CONSOLE_SCRIPT), "serve", "--host", "127.0.0.1", "--port", str(port), *options]
    with open(log_path, "wb") as stderr, open(log_path.with_suffix(".stdout"), "wb") as stdout:
        process = subprocess.Popen(
            command, env=env, stdout=stdout, stderr=stderr, preexec_fn=preexec_fn
        )
    return Server(process=process, base_url=base_url, data_dir=data_dir, log_path=log_path)


@contextlib.contextmanager
def serving(
    data_dir: Path,
    log_name: str,
    *options: str,
    env: dict[str, str] | None = None,
    public_url: bool = True,
) -> Iterator[Server]:
    """`koolbase-ota serve` on a free port of 127.0.0.1, answering, stopped at the end."""
    server = launch(data_dir, log_name, *options, env=env, public_url=public_url)
    try:
        wait_until_answering(server)
        yield server
    finally:
        stop(server.process)


def make_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", '{"banner": "hello from e2e"}')
        archive.writestr("images/logo.svg", "<svg xmlns='http://www.w3.org/2000/svg'/>")
    return buffer.getvalue()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.json()["error"], str)


@dataclass
class FirstStart:
    server: Server
    credentials: dict[str, Any]
    log: str

    def project_path(self, rest: str = "") -> str:
        return f"/v1/projects/{self.credentials['project_id']}/ota{rest}"

    @property
    def auth(self) -> dict[str, str]:
        return auth(self.credentials["dashboard_token"])

    def key(self, environment: str) -> dict[str, str]:
        return {"x-api-key": self.credentials["public_keys"][environment]}


@pytest.fixture(scope="module")
def first_start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FirstStart]:
    """One server started on an empty data dir, shared by the tests that only add to it."""
    data_dir = tmp_path_factory.mktemp("e2e") / "data"
    assert not data_dir.exists()
    with serving(data_dir, "first") as server:
        yield FirstStart(server=server, credentials=server.credentials(), log=server.log())


@pytest.fixture
def http(first_start: FirstStart) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=first_start.server.base_url, timeout=10) as client:
        yield client


def test_first_start_creates_the_default_project_and_its_credentials(
    first_start: FirstStart, http: httpx.Client
) -> None:
    data_dir = first_start.server.data_dir.resolve()
    credentials_path = data_dir / CREDENTIALS_FILE
    credentials = first_start.credentials

    assert mode(credentials_path) == 0o600
    assert set(credentials) == {"project_id", "name", "dashboard_token", "public_keys"}
    assert credentials["name"] == "default"
    assert re.fullmatch(r"pk_live_[0-9a-f]{24}", credentials["public_keys"]["production"])
    assert re.fullmatch(r"pk_test_[0-9a-f]{24}", credentials["public_keys"]["staging"])
    assert re.fullmatch(r"pk_test_[0-9a-f]{24}", credentials["public_keys"]["development"])
    # The log says where the credentials are, and does not repeat them.
    assert str(credentials_path) in first_start.log
    assert credentials["dashboard_token"] not in first_start.log
    # Migrated, with exactly that project.
    assert query(data_dir, "SELECT name FROM projects") == [("default",)]
    # And the credentials work at once.
    response = http.get(first_start.project_path("/bundles"), headers=first_start.auth)
    assert response.status_code == 200, response.text
    assert response.json() == []


def test_bundle_lifecycle_over_http(first_start: FirstStart, http: httpx.Client) -> None:
    bundle_zip = make_zip()
    checksum = "sha256:" + hashlib.sha256(bundle_zip).hexdigest()
    project_id = first_start.credentials["project_id"]

    uploaded = http.post(
        first_start.project_path("/upload"),
        headers=first_start.auth,
        files={"bundle": ("my_bundle.zip", bundle_zip, "application/zip")},
        data={"channel": "production", "mandatory": "false", "release_notes": "New banner"},
    )
    assert uploaded.status_code == 201, uploaded.text
    bundle = uploaded.json()
    assert set(bundle) == BUNDLE_FIELDS
    assert bundle["project_id"] == project_id
    assert bundle["version"] == 1
    assert bundle["checksum"] == checksum
    assert bundle["file_size"] == len(bundle_zip)
    assert bundle["storage_path"] == f"ota/{project_id}/production/v1.zip"
    assert bundle["active"] is False
    assert bundle["mandatory"] is False
    bundle_path = first_start.project_path(f"/bundles/{bundle['id']}")

    listed = http.get(first_start.project_path("/bundles"), headers=first_start.auth)
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()] == [bundle["id"]]

    def check(version: int = 0, environment: str = "production") -> dict[str, Any]:
        response = http.get(
            "/v1/sdk/ota/check",
            params={"channel": "production", "version": version},
            headers=first_start.key(environment),
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    assert check() == {"has_update": False}  # uploaded but not released yet

    activated = http.post(bundle_path + "/activate", headers=first_start.auth)
    assert activated.status_code == 200, activated.text
    assert activated.json()["active"] is True

    offer = check()
    assert set(offer) == OFFER_FIELDS
    assert offer["has_update"] is True
    assert offer["version"] == 1
    assert offer["checksum"] == checksum
    assert offer["mandatory"] is False
    assert offer["release_notes"] == "New banner"
    assert offer["file_size"] == len(bundle_zip)
    assert offer["download_url"].startswith(first_start.server.base_url + "/")
    assert check(environment="development")["version"] == 1  # any key of the project works
    assert check(version=1) == {"has_update": False}

    downloaded = httpx.get(offer["download_url"], timeout=10)  # as the SDK: no headers
    assert downloaded.status_code == 200
    assert downloaded.headers["content-type"] == "application/zip"
    assert "sha256:" + hashlib.sha256(downloaded.content).hexdigest() == offer["checksum"]

    for expected in (True, False):
        toggled = http.patch(bundle_path, headers=first_start.auth)  # empty body: toggle
        assert toggled.status_code == 200, toggled.text
        assert toggled.json()["mandatory"] is expected
        assert check()["mandatory"] is expected

    deleted = http.delete(bundle_path, headers=first_start.auth)
    assert deleted.status_code == 204
    assert deleted.content == b""
    listed = http.get(first_start.project_path("/bundles"), headers=first_start.auth)
    assert listed.json() == []
    assert check() == {"has_update": False}
    assert_error(httpx.get(offer["download_url"], timeout=10), 404)


def test_cli_token_works_at_once_and_revoking_it_refuses_it_at_once(
    first_start: FirstStart, http: httpx.Client
) -> None:
    data_dir = first_start.server.data_dir
    bundles = first_start.project_path("/bundles")
    project_id = first_start.credentials["project_id"]
    created = run_cli(data_dir, "token", "create", "--project", project_id, "--json")
    assert created.returncode == 0, created.stderr
    token = created.json()

    assert http.get(bundles, headers=auth(token["dashboard_token"])).status_code == 200

    revoked = run_cli(data_dir, "token", "revoke", token["token_id"])
    assert revoked.returncode == 0, revoked.stderr

    assert_error(http.get(bundles, headers=auth(token["dashboard_token"])), 401)
    assert http.get(bundles, headers=first_start.auth).status_code == 200


def test_cli_key_rotate_takes_effect_within_the_refresh_bound(
    first_start: FirstStart, http: httpx.Client
) -> None:
    old = first_start.key("staging")
    assert http.get("/v1/sdk/ota/check", headers=old).status_code == 200

    rotated = run_cli(
        first_start.server.data_dir,
        *("key", "rotate", "--project", first_start.credentials["project_id"]),
        *("--environment", "staging", "--json"),
    )
    assert rotated.returncode == 0, rotated.stderr
    new = {"x-api-key": rotated.json()["public_key"]}

    # The CLI is another process: the server's cached check sees the change on its next
    # refresh of the change log, within the documented bound.
    eventually(lambda: http.get("/v1/sdk/ota/check", headers=old).status_code == 401, "rotation")
    assert_error(http.get("/v1/sdk/ota/check", headers=old), 401)
    assert http.get("/v1/sdk/ota/check", headers=new).json() == {"has_update": False}
    assert http.get("/v1/sdk/ota/check", headers=first_start.key("production")).status_code == 200


def test_restart_keeps_the_project_and_its_credentials(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    credentials_path = data_dir / CREDENTIALS_FILE
    with serving(data_dir, "before-restart") as server:
        credentials = server.credentials()
    written = credentials_path.read_bytes()
    inode = credentials_path.stat().st_ino

    with serving(data_dir, "after-restart") as server:
        bundles = f"{server.base_url}/v1/projects/{credentials['project_id']}/ota/bundles"
        response = httpx.get(bundles, headers=auth(credentials["dashboard_token"]), timeout=10)
        second_log = server.log()

    assert response.status_code == 200, response.text
    assert credentials_path.read_bytes() == written
    assert credentials_path.stat().st_ino == inode
    assert mode(credentials_path) == 0o600
    assert query(data_dir, "SELECT name FROM projects") == [("default",)]
    assert str(credentials_path.resolve()) not in second_log


def test_a_first_start_that_cannot_write_the_credentials_makes_no_project(tmp_path: Path) -> None:
    """The default project was committed before its credentials file was written: when the
    write failed, a project existed whose token and keys nobody held, and later starts, seeing
    a project, never wrote them."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / CREDENTIALS_FILE).mkdir()  # what stands there cannot be written over
    result = run_cli(data_dir, "serve", "--host", "127.0.0.1", "--port", str(free_port()))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not write "), result
    assert "Traceback" not in result.stderr
    assert query(data_dir, "SELECT count(*) FROM projects") == [(0,)]

    (data_dir / CREDENTIALS_FILE).rmdir()
    with serving(data_dir, "after-the-failed-start") as server:
        credentials = server.credentials()
        bundles = f"{server.base_url}/v1/projects/{credentials['project_id']}/ota/bundles"
        response = httpx.get(bundles, headers=auth(credentials["dashboard_token"]), timeout=10)
    assert response.status_code == 200, response.text
    assert query(data_dir, "SELECT name FROM projects") == [("default",)]


#: How uvicorn (the default) and granian log a started worker process.
WORKER_STARTED = re.compile(r"Started server process \[(\d+)\]|Spawning worker-\d+ with PID: (\d+)")


def worker_pids(log: str) -> set[int]:
    return {int(uvicorn or granian) for uvicorn, granian in WORKER_STARTED.findall(log)}


def test_two_workers_serve_a_project_made_with_the_cli(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    created = run_cli(data_dir, "project", "create", "shop", "--json")
    assert created.returncode == 0, created.stderr
    project = created.json()
    key = {"x-api-key": project["public_keys"]["production"]}

    with serving(data_dir, "workers", "--workers", "2") as server:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while len(worker_pids(server.log())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = worker_pids(server.log())
        assert len(pids) == 2, server.log()
        assert server.process.pid not in pids
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            answers = [http.get("/v1/sdk/ota/check", headers=key) for _ in range(20)]
            unknown = http.get("/v1/sdk/ota/check", headers={"x-api-key": "pk_live_" + "0" * 24})

    assert [answer.status_code for answer in answers] == [200] * 20
    assert all(answer.json() == {"has_update": False} for answer in answers)
    assert_error(unknown, 401)
    # A project already existed: no `default`, no credentials file.
    assert not (data_dir / CREDENTIALS_FILE).exists()
    assert query(data_dir, "SELECT name FROM projects") == [("shop",)]
    # Stopping serve stopped its workers too.
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_a_worker_stalled_for_seconds_is_not_replaced(tmp_path: Path) -> None:
    """uvicorn's supervisor killed and replaced a worker that did not answer its ping within
    5 s: one starved of CPU on a loaded host, which a cold replacement only loads more. A
    worker stopped for 8 s (SIGSTOP, then SIGCONT) now keeps serving."""
    with serving(tmp_path / "data", "stall", "--workers", "2") as server:
        eventually(lambda: len(worker_pids(server.log())) == 2, "two workers", within=60)
        pids = worker_pids(server.log())
        stalled = min(pids)
        os.kill(stalled, signal.SIGSTOP)
        try:
            time.sleep(8)
        finally:
            os.kill(stalled, signal.SIGCONT)
        time.sleep(2)  # the supervisor's next look
        assert worker_pids(server.log()) == pids, server.log()
        assert "died" not in server.log()
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            assert all(http.get("/healthz").status_code == 200 for _ in range(10))


def test_without_a_public_url_downloads_point_at_the_port_served_on(tmp_path: Path) -> None:
    """`KOOLBASE_OTA_PUBLIC_URL`'s default was fixed at port 8080: served on another port
    (`make run PORT=8091`), every download URL pointed at 8080, where nothing answered, or
    another server refused it (403). Unset, it now follows the address and port served on,
    in every worker."""
    with serving(tmp_path / "data", "port", "--workers", "2", public_url=False) as server:
        credentials = server.credentials()
        project = f"/v1/projects/{credentials['project_id']}/ota"
        token = auth(credentials["dashboard_token"])
        bundle_zip = make_zip()
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            files = {"bundle": ("bundle.zip", bundle_zip, "application/zip")}
            bundle = http.post(project + "/upload", headers=token, files=files).json()
            activated = http.post(project + f"/bundles/{bundle['id']}/activate", headers=token)
            assert activated.status_code == 200, activated.text
            key = {"x-api-key": credentials["public_keys"]["production"]}
            offers = [http.get("/v1/sdk/ota/check?version=0", headers=key) for _ in range(8)]
            urls = {offer.json()["download_url"] for offer in offers}
            # Each worker signs its own URLs; both point here, and both download the bundle.
            assert all(url.startswith(server.base_url + "/v1/downloads/") for url in urls), urls
            for url in urls:
                downloaded = httpx.get(url, timeout=10)
                assert downloaded.status_code == 200, downloaded.text
                assert downloaded.content == bundle_zip


def test_serve_raises_its_open_file_limit_to_the_hard_one(tmp_path: Path) -> None:
    """Every connection is an open file, and services often start with a soft limit of 1024
    (here 256): a thousand devices kept alive would leave no check accepted at all."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip(f"the hard limit here is {hard}: there is nothing to raise")

    def lower_the_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    server = launch(tmp_path / "data", "nofile", preexec_fn=lower_the_soft_limit)
    try:
        wait_until_answering(server)
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
    finally:
        stop(server.process)
    (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    soft_now = line.split()[3]
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    assert soft_now == str(wanted), line


def test_the_real_server_answers_413_before_and_during_the_body(tmp_path: Path) -> None:
    """The HTTP server we ship (not the test harness's) delivers the 413 to real clients."""
    data_dir = tmp_path / "data"
    limit = 64 * 1024
    with serving(data_dir, "limit", env={"KOOLBASE_OTA_MAX_BUNDLE_BYTES": str(limit)}) as server:
        credentials = server.credentials()
        path = f"/v1/projects/{credentials['project_id']}/ota/upload"
        host, port = server.base_url.removeprefix("http://").split(":")
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {credentials['dashboard_token']}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {1024**4}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head)  # never a byte of the body
            raw, status_line, _, body = read_http_response(sock)
        assert status_line.startswith("HTTP/1.1 413"), raw[:200]
        assert b"100 Continue" not in raw
        assert json.loads(body)["code"] == "bundle_too_large"

        bundle = tmp_path / "big.zip"
        with zipfile.ZipFile(bundle, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("blob.bin", b"\0" * (4 * limit))
        curl = shutil.which("curl")
        assert curl is not None
        for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
            result = subprocess.run(
                [
                    curl,
                    "-sS",
                    "--max-time",
                    "20",
                    "-w",
                    "\n%{http_code}",
                    "-H",
                    f"Authorization: Bearer {credentials['dashboard_token']}",
                    *extra,
                    "-F",
                    f"bundle=@{bundle}",
                    server.base_url + path,
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            answer, _, status = result.stdout.rpartition("\n")
            assert status == "413"
            assert json.loads(answer)["code"] == "bundle_too_large"
        listing = httpx.get(
            f"{server.base_url}/v1/projects/{credentials['project_id']}/ota/bundles",
            headers=auth(credentials["dashboard_token"]),
        )
        assert listing.json() == []
