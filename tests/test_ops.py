"""Operations: health, readiness against backends that really fail, metrics, and logs that
never carry a secret."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from koolbase_ota.logs import RedactingFilter, logging_config
from koolbase_ota.ops import HeadAsGetMiddleware
from tests.conftest import Project, RunningServer, make_zip, new_project, released, start_server
from tests.services import PostgresService, SeaweedService
from tests.test_cli import create_project
from tests.test_e2e import auth, serving


def test_healthz_says_the_process_is_alive(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_checks_database_and_store(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "storage": "ok"}}


def _head_then_get(base_url: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    """A HEAD and a GET of `path` pipelined on one connection: everything the server sends."""
    url = httpx.URL(base_url)
    assert url.port is not None
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    request = f"{{}} {path} HTTP/1.1\r\nHost: x\r\n{lines}\r\n"
    with socket.create_connection((url.host, url.port), timeout=30) as connection:
        connection.sendall(request.format("HEAD").encode() + request.format("GET").encode())
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith((b"}", b"]")):
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def _assert_head_is_get_without_body(received: bytes, status: bytes) -> None:
    head, get = received.split(b"HTTP/1.1 ")[1:]
    assert head.startswith(status + b" "), received
    assert get.startswith(status + b" "), received
    # The HEAD's head ends the HEAD: no body before the GET's status line, and the length the
    # GET's body has.
    head_headers = head.split(b"\r\n\r\n")[0].lower()
    get_headers, get_body = get.split(b"\r\n\r\n", 1)
    assert head.endswith(b"\r\n\r\n"), received
    assert f"content-length: {len(get_body)}".encode() in head_headers, received
    assert f"content-length: {len(get_body)}".encode() in get_headers.lower(), received
    assert get_body, received


@pytest.mark.parametrize("interface", ["uvicorn", "asgi", "rsgi"])
def test_every_get_route_answers_head_without_a_body(tmp_path: Path, interface: str) -> None:
    """RFC 9110 9.3.2: HEAD is GET's answer without the body. Monitors that probe with HEAD
    got 405 from the health checks, and every other GET route (the checks, the dashboard's
    reads) still answered HEAD with 405."""
    env = {"KOOLBASE_OTA_SERVER_INTERFACE": interface}
    data_dir = tmp_path / "data"
    with serving(data_dir, f"head-{interface}", env=env) as server:
        credentials = json.loads((data_dir / "credentials.json").read_text())
        project = f"/v1/projects/{credentials['project_id']}"
        token = {"Authorization": f"Bearer {credentials['dashboard_token']}"}
        key = {"x-api-key": credentials["public_keys"]["production"]}
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            bundle = client.post(
                f"{project}/ota/upload",
                headers=token,
                files={"bundle": ("b.zip", make_zip(), "application/zip")},
            ).json()
            activated = client.post(f"{project}/ota/bundles/{bundle['id']}/activate", headers=token)
            assert activated.status_code == 200, activated.text
        cases: list[tuple[str, dict[str, str], bytes]] = [
            ("/healthz", {}, b"200"),
            ("/readyz", {}, b"200"),
            ("/v1/sdk/ota/check?version=0", key, b"200"),
            ("/v1/sdk/ota/check?version=0", {}, b"401"),
            ("/v1/code-push/check?channel=production&current_bundle=0", key, b"200"),
            (f"{project}/ota/bundles", token, b"200"),
            (f"{project}/ota/bundles", {}, b"401"),
            (f"{project}/ota/channels", token, b"200"),
            (f"{project}/audit", token, b"200"),
        ]
        for path, headers, status in cases:
            received = _head_then_get(server.base_url, path, headers)
            _assert_head_is_get_without_body(received, status)
        # The check's HEAD offers what its GET offers.
        assert b'"download_url"' in _head_then_get(server.base_url, cases[2][0], key)


def test_head_is_counted_as_head_under_its_route_and_allow_names_it(
    client: httpx.Client, project: Project
) -> None:
    response = client.head(project.path("/bundles"), headers=project.auth)
    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["content-length"]) == len(
        client.get(project.path("/bundles"), headers=project.auth).content
    )
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    head = 'koolbase_ota_requests_total{method="HEAD",route="/v1/projects/{project_id}/ota/bundles"'
    assert head in metrics.text
    # A 405 lists HEAD wherever GET is allowed; a route without GET still refuses HEAD.
    refused = client.post(project.path("/bundles"), headers=project.auth)
    assert refused.status_code == 405
    assert sorted(refused.headers["allow"].split(", ")) == ["GET", "HEAD"]
    assert refused.json()["code"] == "method_not_allowed"
    upload_head = client.head(project.path("/upload"), headers=project.auth)
    assert upload_head.status_code == 405
    assert upload_head.headers["allow"] == "POST"


def test_metrics_count_requests_by_route_errors_and_uploads(
    client: httpx.Client, project: Project
) -> None:
    released(client, project)
    assert client.get("/v1/sdk/ota/check", headers=project.key()).status_code == 200
    assert client.get("/v1/sdk/ota/check", headers={"x-api-key": "pk_live_nope"}).status_code == 401
    assert client.get(f"/nowhere/{project.id}").status_code == 404
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert (
        'koolbase_ota_requests_total{method="GET",route="/v1/sdk/ota/check",status="200"}' in text
    )
    assert (
        'koolbase_ota_requests_total{method="GET",route="/v1/sdk/ota/check",status="401"}' in text
    )
    # Unknown paths share one label: a scanner cannot blow up the number of series.
    assert 'route="unmatched",status="404"' in text
    assert str(project.id) not in text
    assert 'koolbase_ota_errors_total{code="invalid_api_key"}' in text
    assert 'koolbase_ota_uploads_total{result="stored"}' in text
    assert "koolbase_ota_upload_bytes_total" in text
    assert "koolbase_ota_request_duration_seconds_bucket" in text


@pytest.fixture
def own_postgres() -> Iterator[PostgresService]:
    """A PostgreSQL of this test's own, to stop without disturbing the rest of the suite."""
    with PostgresService() as service:
        yield service


def test_readyz_is_503_while_the_database_is_down(
    own_postgres: PostgresService, tmp_path: Path
) -> None:
    server = start_server(
        tmp_path, database_url=own_postgres.create_database(), database_timeout_seconds=2
    )
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            own_postgres.stop()
            response = client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["checks"] == {"database": "unavailable", "storage": "ok"}
            assert client.get("/healthz").status_code == 200
            own_postgres.start()
            assert client.get("/readyz").status_code == 200
    finally:
        server.stop()


def test_readyz_is_503_while_the_store_hangs(tmp_path: Path) -> None:
    with SeaweedService() as seaweed:
        server = start_server(
            tmp_path,
            storage_url=f"s3://{seaweed.bucket}/ready",
            s3_endpoint=seaweed.endpoint,
            s3_region=seaweed.region,
            aws_access_key_id=seaweed.access_key,
            aws_secret_access_key=seaweed.secret_key,
            storage_timeout_seconds=1,
        )
        try:
            with httpx.Client(base_url=server.base_url, timeout=60) as client:
                assert client.get("/readyz").status_code == 200
                seaweed.pause()
                try:
                    response = client.get("/readyz")
                finally:
                    seaweed.resume()
                assert response.status_code == 503
                assert response.json()["checks"] == {"database": "ok", "storage": "unavailable"}
        finally:
            server.stop()


def test_json_logs_carry_no_token_key_or_signature(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    project = create_project(data_dir)
    token = project["dashboard_token"]
    key = project["public_keys"]["production"]
    path = f"/v1/projects/{project['project_id']}/ota"
    env = {"KOOLBASE_OTA_LOG_FORMAT": "json", "KOOLBASE_OTA_ACCESS_LOG": "true"}
    with serving(data_dir, "json", env=env) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            bundle = client.post(
                path + "/upload",
                headers=auth(token),
                files={"bundle": ("b.zip", make_zip(), "application/zip")},
            ).json()
            client.post(f"{path}/bundles/{bundle['id']}/activate", headers=auth(token))
            offer = client.get("/v1/sdk/ota/check", headers={"x-api-key": key}).json()
            assert client.get(offer["download_url"]).status_code == 200
            # Secrets in the wrong places, where a careless log line would pick them up.
            client.get(f"/v1/sdk/ota/check?key={key}&token={token}")
            client.get(path + "/bundles", headers=auth(token + "x"))
        log = server.log()
    signature = offer["download_url"].split("signature=")[1]
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    assert any("/v1/sdk/ota/check" in entry["message"] for entry in entries)
    for secret in (token, key, signature):
        assert secret not in log


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_logged_traceback_carries_no_token_key_or_signature(log_format: str) -> None:
    """The filter scrubs a record's message; a traceback is written by the formatter, and
    the text one (the default) wrote it raw."""
    config = logging_config(log_format)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(config["formatters"]["default"]["()"]())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("koolbase_ota.tests.secrets")
    logger.propagate = False
    logger.addHandler(handler)
    token = "kbota_" + "t" * 40
    key = "pk_live_" + "0123456789abcdef01234567"
    signature = "0f" * 32
    try:
        raise RuntimeError(f"refused {token} for {key} at /x?expires=1&signature={signature}")
    except RuntimeError:
        logger.exception("the request failed")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert "the request failed" in written
    assert "RuntimeError" in written
    for secret in (token, key, signature):
        assert secret not in written


def test_each_backend_pair_serves_the_whole_flow(server: RunningServer) -> None:
    """The smallest proof the `backend` fixture really switches backends."""
    db_kind = server.db.engine.dialect.name
    assert db_kind == ("sqlite" if server.backend == "sqlite-local" else "postgresql")
    assert server.serves_downloads == (server.backend == "sqlite-local")
    project = new_project(server.db)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        bundle = released(client, project)
    assert bundle["storage_path"] in server.stored_keys()


def test_readyz_is_503_when_the_store_check_fails_unexpectedly(
    server: RunningServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store client's error of a kind the stores do not wrap was a 500 from /readyz (a
    fault that cannot be caused for real, hence the stand-in): it is a backend that cannot be
    used, 503 like the database."""

    async def failing() -> None:
        raise RuntimeError("an error of no expected kind")

    monkeypatch.setattr(server.context.store, "check", failing)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "storage": "unavailable"},
    }


def test_serve_warns_when_s3_is_set_up_but_the_store_is_local(tmp_path: Path) -> None:
    """An endpoint set without an s3:// storage URL kept every bundle on local disk silently."""
    env = {"KOOLBASE_OTA_S3_ENDPOINT": "http://127.0.0.1:9"}
    with serving(tmp_path / "data", "s3-unused", env=env) as server:
        assert httpx.get(server.base_url + "/readyz").status_code == 200
        log = server.log()
    assert "KOOLBASE_OTA_S3_ENDPOINT is set but KOOLBASE_OTA_STORAGE_URL is not" in log
    with serving(tmp_path / "other", "s3-unset") as server:
        log = server.log()
    assert "KOOLBASE_OTA_S3_ENDPOINT" not in log


def test_head_as_get_sends_no_file_a_get_route_would_send() -> None:
    """A GET route that hands the server a file (ASGI's zerocopysend or pathsend) answers HEAD
    with the headers and an empty body: the file is never passed on."""

    async def sends_file(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["method"] == "GET"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.zerocopysend", "file": None, "more_body": True})
        await send({"type": "http.response.pathsend", "path": "/etc/hostname"})

    route = Route("/file", sends_file, methods=["GET"])
    route.methods = {"GET"}  # as FastAPI's routes: no HEAD of their own
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "HEAD", "path": "/file", "headers": [], "root_path": ""}
    asyncio.run(HeadAsGetMiddleware(sends_file, [route])(scope, receive, send))
    assert sent == [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]
