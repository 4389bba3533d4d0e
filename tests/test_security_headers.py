"""Standard security headers on every answer, and CORS only for the configured origins."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from koolbase_ota.app import create_app
from koolbase_ota.config import Settings
from koolbase_ota.security import cors_origins
from tests.conftest import (
    Project,
    RunningServer,
    assert_error,
    new_project,
    released,
    start_server,
)

STANDARD = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
CSP = "default-src 'none'; frame-ancestors 'none'"
DASHBOARD = "https://dash.example"


@pytest.fixture(scope="module")
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunningServer]]:
    """Servers on the embedded default (the headers do not depend on the backends)."""
    started: list[RunningServer] = []

    def make(**overrides: str) -> RunningServer:
        running = start_server(tmp_path_factory.mktemp("server"), **overrides)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture(scope="module")
def plain(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server()


@pytest.fixture
def client(plain: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=plain.base_url, timeout=30) as http:
        yield http


@pytest.fixture
def project(plain: RunningServer) -> Project:
    return new_project(plain.db)


def assert_secured(response: httpx.Response, *, csp: bool = True) -> None:
    for name, value in STANDARD.items():
        assert response.headers.get(name) == value, (name, response.headers)
        assert len(response.headers.get_list(name)) == 1, name
    if csp:
        assert response.headers.get("content-security-policy") == CSP
    else:
        assert "content-security-policy" not in response.headers


def test_an_api_answer_has_the_headers(client: httpx.Client, project: Project) -> None:
    response = client.get(project.path("/bundles"), headers=project.auth)

    assert response.status_code == 200
    assert_secured(response)


def test_errors_have_the_headers(client: httpx.Client, project: Project) -> None:
    missing = client.get(project.path("/bundles"))
    assert_error(missing, 401, "missing_token")
    assert_secured(missing)
    no_route = client.get("/nowhere")
    assert_error(no_route, 404)
    assert_secured(no_route)


def test_the_check_fast_path_has_the_headers(client: httpx.Client, project: Project) -> None:
    released(client, project)

    offer = client.get("/v1/sdk/ota/check", headers=project.key(), params={"version": "0"})
    refused = client.get("/v1/sdk/ota/check")

    assert offer.status_code == 200
    assert offer.json()["has_update"] is True
    assert_secured(offer)
    assert_error(refused, 401, "missing_api_key")
    assert_secured(refused)


def test_a_download_has_the_headers(client: httpx.Client, project: Project) -> None:
    released(client, project)
    offer = client.get("/v1/sdk/ota/check", headers=project.key()).json()

    download = client.get(offer["download_url"])
    partial = client.get(offer["download_url"], headers={"Range": "bytes=0-9"})

    assert download.status_code == 200
    assert download.headers["content-type"] == "application/zip"
    assert_secured(download)
    assert partial.status_code == 206
    assert_secured(partial)


def test_the_docs_load_their_scripts(client: httpx.Client) -> None:
    for path in ("/docs", "/redoc"):
        response = client.get(path)
        assert response.status_code == 200
        assert_secured(response, csp=False)
    assert_secured(client.get("/openapi.json"))


def test_cors_is_off_by_default(client: httpx.Client, project: Project) -> None:
    preflight = client.options(
        project.path("/bundles"),
        headers={"Origin": DASHBOARD, "Access-Control-Request-Method": "GET"},
    )
    simple = client.get(project.path("/bundles"), headers={**project.auth, "Origin": DASHBOARD})

    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code == 405
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers


def test_cors_allows_only_the_configured_origins(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(cors_origins=f"{DASHBOARD}, https://other.example/")
    project = new_project(server.db)
    asked = {
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, content-type",
    }

    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        allowed = http.options(project.path("/bundles"), headers={"Origin": DASHBOARD, **asked})
        refused = http.options(
            project.path("/bundles"), headers={"Origin": "https://evil.example", **asked}
        )
        simple = http.get(project.path("/bundles"), headers={**project.auth, "Origin": DASHBOARD})
        foreign = http.get(
            project.path("/bundles"), headers={**project.auth, "Origin": "https://evil.example"}
        )

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == DASHBOARD
    assert "PATCH" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert_secured(allowed)
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    assert simple.headers["access-control-allow-origin"] == DASHBOARD
    assert "access-control-allow-origin" not in foreign.headers


def test_a_cors_download_range_is_answered_by_the_app_with_the_file_bytes(
    make_server: Callable[..., RunningServer],
) -> None:
    """With CORS on, a download carrying an Origin goes through the app (its CORS headers
    depend on the Origin): a range there is still the file's bytes, sent by the server."""
    server = make_server(cors_origins=DASHBOARD)
    project = new_project(server.db)
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        released(http, project)
        url = http.get("/v1/sdk/ota/check", headers=project.key()).json()["download_url"]
        whole = http.get(url).content
        ranged = http.get(url, headers={"Origin": DASHBOARD, "Range": "bytes=10-29"})

    assert ranged.status_code == 206
    assert ranged.content == whole[10:30]
    assert ranged.headers["content-range"] == f"bytes 10-29/{len(whole)}"
    assert ranged.headers["access-control-allow-origin"] == DASHBOARD


def test_an_unexpected_error_has_the_headers(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.get("/boom")

    response = asyncio.run(call())

    assert_error(response, 500, "internal_error")
    assert_secured(response)


def test_cors_origins_setting_is_a_comma_separated_list() -> None:
    assert cors_origins("") == []
    assert cors_origins(" , ") == []
    assert cors_origins("https://a.example, https://b.example/") == [
        "https://a.example",
        "https://b.example",
    ]


def test_the_setting_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KOOLBASE_OTA_CORS_ORIGINS", DASHBOARD)
    assert Settings(data_dir=tmp_path).cors_origins == DASHBOARD
