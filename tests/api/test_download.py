"""Signed download URLs served by this server itself on the embedded default."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest

from koolbase_ota.storage.signing import signed_path
from tests.conftest import (
    Project,
    RunningServer,
    assert_error,
    make_zip,
    new_project,
    upload,
)

CONTENT = make_zip({"config.json": '{"banner": "download"}', "strings/en.json": "{}" * 200})


def release(client: httpx.Client, project: Project, content: bytes = CONTENT) -> dict[str, Any]:
    response = upload(client, project, content)
    assert response.status_code == 201, response.text
    bundle: dict[str, Any] = response.json()
    activated = client.post(project.path(f"/bundles/{bundle['id']}/activate"), headers=project.auth)
    assert activated.status_code == 200, activated.text
    return bundle


def download_url(client: httpx.Client, project: Project) -> str:
    response = client.get("/v1/sdk/ota/check", params={"version": 0}, headers=project.key())
    assert response.status_code == 200, response.text
    url: str = response.json()["download_url"]
    return url


def with_query(url: str, query: list[tuple[str, str]]) -> str:
    parts = urlsplit(url)
    return parts._replace(query=urlencode(query)).geturl()


def query_of(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


@pytest.fixture
def url(client: httpx.Client, project: Project) -> str:
    release(client, project)
    return download_url(client, project)


def test_get_serves_the_bundle_as_a_zip(client: httpx.Client, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 200
    assert response.content == CONTENT
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-length"] == str(len(CONTENT))
    assert response.headers["etag"]


def test_a_plain_get_without_headers_works(url: str) -> None:
    # What the SDK does: a bare GET on the URL, nothing else.
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == CONTENT


def test_head_has_the_headers_and_no_body(client: httpx.Client, url: str) -> None:
    get = client.get(url)
    head = client.head(url)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == "application/zip"
    assert head.headers["content-length"] == str(len(CONTENT))
    assert head.headers["etag"] == get.headers["etag"]


def test_a_byte_range_is_206(client: httpx.Client, url: str) -> None:
    response = client.get(url, headers={"Range": "bytes=0-9"})
    assert response.status_code == 206
    assert response.content == CONTENT[:10]
    assert response.headers["content-range"] == f"bytes 0-9/{len(CONTENT)}"
    assert response.headers["content-length"] == "10"


def test_a_resumed_download_gets_the_rest(client: httpx.Client, url: str) -> None:
    start = len(CONTENT) // 2
    response = client.get(url, headers={"Range": f"bytes={start}-"})
    assert response.status_code == 206
    assert response.content == CONTENT[start:]
    assert response.headers["content-range"] == f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}"


def test_a_suffix_range_is_the_last_bytes(client: httpx.Client, url: str) -> None:
    response = client.get(url, headers={"Range": "bytes=-5"})
    assert response.status_code == 206
    assert response.content == CONTENT[-5:]
    size = len(CONTENT)
    assert response.headers["content-range"] == f"bytes {size - 5}-{size - 1}/{size}"


def _tampered_signature(url: str) -> str:
    query = query_of(url)
    return with_query(
        url,
        [
            (name, value[:-1] + ("0" if value[-1] != "0" else "1"))
            if name == "signature"
            else (name, value)
            for name, value in query
        ],
    )


def _tampered_expiry(url: str) -> str:
    query = query_of(url)
    return with_query(
        url,
        [
            (name, str(int(value) + 1)) if name == "expires" else (name, value)
            for name, value in query
        ],
    )


def _stripped_signature(url: str) -> str:
    return with_query(url, [(name, value) for name, value in query_of(url) if name != "signature"])


def _no_query(url: str) -> str:
    return with_query(url, [])


def _added_parameter(url: str) -> str:
    return with_query(url, [*query_of(url), ("download", "1")])


def _doubled_signature(url: str) -> str:
    signature = dict(query_of(url))["signature"]
    return with_query(url, [*query_of(url), ("signature", signature)])


@pytest.mark.parametrize(
    "tamper",
    [
        _tampered_signature,
        _tampered_expiry,
        _stripped_signature,
        _no_query,
        _added_parameter,
        _doubled_signature,
    ],
)
def test_a_tampered_url_is_403(
    client: httpx.Client, url: str, tamper: Callable[[str], str]
) -> None:
    assert client.get(url).status_code == 200
    assert_error(client.get(tamper(url)), 403, "invalid_signature")


def test_a_signature_does_not_open_another_bundle(client: httpx.Client, project: Project) -> None:
    release(client, project)
    url = download_url(client, project)
    release(client, project, make_zip({"other.json": "{}"}))
    other_url = download_url(client, project)
    assert "/v1.zip?" in url
    assert "/v2.zip?" in other_url
    assert client.get(other_url).status_code == 200

    moved = url.replace("/v1.zip?", "/v2.zip?")
    assert_error(client.get(moved), 403, "invalid_signature")


def test_a_signature_does_not_open_another_projects_bundle(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    release(client, project)
    url = download_url(client, project)
    other = new_project(server.db)
    release(client, other)
    moved = url.replace(str(project.id), str(other.id))
    assert moved != url
    assert_error(client.get(moved), 403, "invalid_signature")


def test_an_expired_url_is_403(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    bundle = release(client, project)
    path = signed_path(
        server.settings.secret_key,
        bundle["storage_path"],
        ttl_seconds=60,
        now=time.time() - 3600,
    )
    assert_error(client.get(server.base_url + path), 403, "url_expired")
    # The same path signed now opens, so it is the expiry, not the signature, that refuses.
    fresh = signed_path(server.settings.secret_key, bundle["storage_path"], ttl_seconds=60)
    assert client.get(server.base_url + fresh).status_code == 200


def test_a_url_expires_after_the_configured_ttl(
    server_factory: Callable[..., RunningServer],
) -> None:
    short = server_factory(url_ttl_seconds=60)
    project = new_project(short.db)
    with httpx.Client(base_url=short.base_url, timeout=30) as client:
        release(client, project)
        before = time.time()
        url = download_url(client, project)
        expires = int(dict(query_of(url))["expires"])
        assert before + 60 - 2 <= expires <= time.time() + 60 + 1
        assert client.get(url).status_code == 200


def test_a_url_signed_with_another_secret_is_403(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    bundle = release(client, project)
    path = signed_path(
        "another secret key of at least 32 chars", bundle["storage_path"], ttl_seconds=60
    )
    assert_error(client.get(server.base_url + path), 403, "invalid_signature")


def test_a_deleted_bundle_is_404(client: httpx.Client, project: Project) -> None:
    bundle = release(client, project)
    url = download_url(client, project)
    assert client.get(url).status_code == 200
    deleted = client.delete(project.path(f"/bundles/{bundle['id']}"), headers=project.auth)
    assert deleted.status_code == 204
    assert_error(client.get(url), 404)
    assert client.head(url).status_code == 404
