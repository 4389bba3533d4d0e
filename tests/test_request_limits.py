"""Request limits: the body of every request but an upload, and the header bounds of the HTTP
server we ship."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from koolbase_ota.config import Settings
from koolbase_ota.error_handlers import install_error_handlers
from koolbase_ota.security import BodyLimitMiddleware
from tests.api.test_upload import read_http_response
from tests.conftest import RunningServer, assert_error, make_zip, new_project, upload, uploaded
from tests.test_e2e import auth, serving

LIMIT = 1024


def bundle_state(client: httpx.Client, path: str, token_headers: dict[str, str]) -> list[bool]:
    return [bundle["mandatory"] for bundle in client.get(path, headers=token_headers).json()]


class Note(BaseModel):
    text: str


def counted_413(client: httpx.Client) -> float:
    """The PATCHes of a bundle answered 413 that /metrics counts (in this test process)."""
    series = (
        'koolbase_ota_requests_total{method="PATCH",'
        'route="/v1/projects/{project_id}/ota/bundles/{bundle_id}",status="413"} '
    )
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(series):
            return float(line.removeprefix(series))
    return 0.0


def test_default_body_limit_is_set() -> None:
    assert Settings().max_request_body_bytes == 64 * 1024


def test_a_json_body_over_the_limit_is_refused_before_it_is_read(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(max_request_body_bytes=LIMIT)
    project = new_project(server.db)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        bundle = uploaded(client, project, channel="production")
        path = project.path(f"/bundles/{bundle['id']}")
        padding = " " * (2 * LIMIT)
        before = counted_413(client)
        response = client.patch(
            path,
            headers={**project.auth, "content-type": "application/json"},
            content=f'{{"mandatory": true}}{padding}',
        )
        assert_error(response, 413, "request_too_large")
        assert str(LIMIT) in response.json()["error"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert bundle_state(client, project.path("/bundles"), project.auth) == [False]
        # Counted under its route, though answered before routing (it was "unmatched", with
        # the unknown paths of scanners).
        assert counted_413(client) == before + 1
        # Just under the limit is fine.
        small = client.patch(path, headers=project.auth, json={"mandatory": True})
        assert small.status_code == 200, small.text
        assert small.json()["mandatory"] is True


def test_a_chunked_body_over_the_limit_is_cut_off_while_it_is_read(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(max_request_body_bytes=LIMIT)
    project = new_project(server.db)

    def chunks() -> Iterator[bytes]:
        yield b'{"mandatory": true'
        for _ in range(64):
            yield b" " * 256
        yield b"}"

    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        bundle = uploaded(client, project, channel="production")
        response = client.patch(
            project.path(f"/bundles/{bundle['id']}"),
            headers={**project.auth, "content-type": "application/json"},
            content=chunks(),  # no Content-Length: Transfer-Encoding: chunked
        )
        assert_error(response, 413, "request_too_large")
        assert bundle_state(client, project.path("/bundles"), project.auth) == [False]
        audit = client.get(f"/v1/projects/{project.id}/audit", headers=project.auth).json()
        assert "bundle.mandatory" not in [event["action"] for event in audit]


def test_openapi_documents_the_413(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    patch = paths["/v1/projects/{project_id}/ota/bundles/{bundle_id}"]["patch"]
    assert "request_too_large" in patch["responses"]["413"]["description"]
    upload_413 = paths["/v1/projects/{project_id}/ota/upload"]["post"]["responses"]["413"]
    assert "request_too_large" not in upload_413.get("description", "")


def test_uploads_are_bounded_by_the_bundle_limit_not_the_body_limit(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(max_request_body_bytes=LIMIT)
    project = new_project(server.db)
    bundle = make_zip({f"asset-{n}.bin": os.urandom(4096) for n in range(8)})
    assert len(bundle) > LIMIT
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        response = upload(client, project, bundle, channel="production")
    assert response.status_code == 201, response.text


def test_a_route_whose_body_the_framework_parses_still_answers_413() -> None:
    """FastAPI turns any error while it parses a declared body into a 400 "error parsing the
    body"; the limit's answer must be the 413 all the same, for routes added later too."""

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=LIMIT)

    @app.post("/notes")
    async def add_note(note: Note) -> dict[str, int]:
        return {"length": len(note.text)}

    async def exchange() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def chunks() -> AsyncIterator[bytes]:
                yield b'{"text": "'
                for _ in range(8):
                    yield b"x" * 256
                yield b'"}'

            small = await client.post("/notes", json={"text": "hello"})
            declared = await client.post("/notes", json={"text": "x" * (2 * LIMIT)})
            streamed = await client.post(
                "/notes", content=chunks(), headers={"content-type": "application/json"}
            )
            return small, declared, streamed

    small, declared, streamed = asyncio.run(exchange())
    assert small.json() == {"length": 5}
    assert_error(declared, 413, "request_too_large")
    assert_error(streamed, 413, "request_too_large")


def test_the_real_server_bounds_header_count_and_size(tmp_path: Path) -> None:
    """The server refuses more than 100 headers or a request head over 64 KiB with 431,
    and a JSON body over the limit gets our 413, then goes on serving."""
    with serving(tmp_path / "data", "headers") as server:
        host, port = server.base_url.removeprefix("http://").split(":")

        def exchange(request: bytes) -> tuple[str, bytes]:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(request)
                _raw, status_line, _headers, body = read_http_response(sock)
            return status_line, body

        start = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n".encode()
        many = b"".join(b"X-Header-%d: v\r\n" % number for number in range(101))
        assert exchange(start + many + b"\r\n")[0].startswith("HTTP/1.1 431")
        huge = b"X-Huge: " + b"a" * (1024 * 1024) + b"\r\n"
        assert exchange(start + huge + b"\r\n")[0].startswith("HTTP/1.1 431")

        credentials = server.credentials()
        patch = (
            f"PATCH /v1/projects/{credentials['project_id']}/ota/bundles/x HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {credentials['dashboard_token']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {1024**3}\r\n\r\n"
        ).encode()
        status_line, body = exchange(patch)  # never a byte of the body
        assert status_line.startswith("HTTP/1.1 413"), status_line
        assert json.loads(body)["code"] == "request_too_large"

        assert httpx.get(server.base_url + "/healthz").status_code == 200
        listing = httpx.get(
            f"{server.base_url}/v1/projects/{credentials['project_id']}/ota/bundles",
            headers=auth(credentials["dashboard_token"]),
        )
        assert listing.json() == []


def test_the_real_server_hangs_up_on_headers_that_never_end(tmp_path: Path) -> None:
    """A client that starts a request and never finishes its headers (slowloris) is cut off
    after KOOLBASE_OTA_HEADER_TIMEOUT_SECONDS, while others are served meanwhile."""
    env = {"KOOLBASE_OTA_HEADER_TIMEOUT_SECONDS": "1"}
    with serving(tmp_path / "data", "header-timeout", env=env) as server:
        host, port = server.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode())
            assert httpx.get(server.base_url + "/healthz").status_code == 200
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):  # until the server closes the connection
                    received += chunk
        # Closed (the 20 s socket timeout would have raised), with at most a 408 and no 200.
        assert received == b"" or received.startswith(b"HTTP/1.1 408"), received[:80]
