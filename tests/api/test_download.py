"""Download URLs handed out by the check, fetched for real on both backends.

On the embedded default this server signs the URLs (HMAC) and serves the files itself; on S3 the
store presigns them (SigV4) and devices download straight from it. Either way a URL serves the
exact bytes, honours ranges, and stops working when it is tampered with, expires or its bundle
is deleted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest

from koolbase_ota.storage import open_store
from koolbase_ota.storage.signing import DOWNLOAD_PREFIX, signed_path
from tests.conftest import (
    Project,
    RunningServer,
    assert_download_refused,
    assert_error,
    eventually,
    make_zip,
    new_project,
    upload,
)
from tests.test_e2e import serving

CONTENT = make_zip({"config.json": '{"banner": "download"}', "strings/en.json": "{}" * 200})


def release(client: httpx.Client, project: Project, content: bytes = CONTENT) -> dict[str, Any]:
    response = upload(client, project, content)
    assert response.status_code == 201, response.text
    bundle: dict[str, Any] = response.json()
    activated = client.post(project.path(f"/bundles/{bundle['id']}/activate"), headers=project.auth)
    assert activated.status_code == 200, activated.text
    return bundle


def check(client: httpx.Client, project: Project) -> dict[str, Any]:
    response = client.get("/v1/sdk/ota/check", params={"version": 0}, headers=project.key())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["has_update"] is True, body
    return body


def download_url(client: httpx.Client, project: Project) -> str:
    url: str = check(client, project)["download_url"]
    return url


def with_query(url: str, query: list[tuple[str, str]]) -> str:
    parts = urlsplit(url)
    return parts._replace(query=urlencode(query)).geturl()


def query_of(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


@dataclass(frozen=True)
class Signed:
    """The query parameters that carry a download URL's signature and expiry."""

    signature: str
    expiry: str


def signed_names(server: RunningServer) -> Signed:
    if server.serves_downloads:
        return Signed(signature="signature", expiry="expires")
    return Signed(signature="X-Amz-Signature", expiry="X-Amz-Expires")


def expires_at(server: RunningServer, url: str) -> float:
    """When the URL stops working, in seconds since the epoch."""
    query = dict(query_of(url))
    if server.serves_downloads:
        return float(query["expires"])
    signed_at = dt.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    return signed_at.timestamp() + int(query["X-Amz-Expires"])


@pytest.fixture
def url(client: httpx.Client, project: Project) -> str:
    release(client, project)
    return download_url(client, project)


@pytest.fixture
def embedded(server: RunningServer) -> RunningServer:
    """The server, for tests of the download route it serves on the embedded default only."""
    if not server.serves_downloads:
        pytest.skip("on S3 devices download from the store: this server serves no bundle bytes")
    return server


# Both backends: what a device gets


def test_a_plain_get_serves_the_exact_bytes_of_the_checksum(
    client: httpx.Client, project: Project
) -> None:
    release(client, project)
    offer = check(client, project)
    # What the SDK does: a bare GET on the URL, no headers, nothing else.
    response = httpx.get(offer["download_url"])
    assert response.status_code == 200, response.text
    assert response.content == CONTENT
    assert response.headers["content-length"] == str(len(CONTENT))
    assert response.headers["content-type"] == "application/zip"
    assert offer["checksum"] == "sha256:" + hashlib.sha256(response.content).hexdigest()
    assert offer["file_size"] == len(response.content)


def test_the_url_points_at_whoever_serves_the_bundles(server: RunningServer, url: str) -> None:
    if server.serves_downloads:
        assert url.startswith(server.base_url + DOWNLOAD_PREFIX)
    else:
        # Devices download from the store itself: the server never proxies bundle bytes.
        assert url.startswith(f"{server.settings.s3_endpoint}/")
        assert not url.startswith(server.base_url)
        assert dict(query_of(url))["X-Amz-Signature"]


def test_only_the_embedded_default_serves_bundles_itself(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    bundle = release(client, project)
    own_url = signed_path(server.settings.secret_key, bundle["storage_path"], ttl_seconds=60)
    response = client.get(own_url)
    if server.serves_downloads:
        assert response.status_code == 200
        assert response.content == CONTENT
    else:
        assert_error(response, 404, "not_found")


def test_a_byte_range_is_206(url: str) -> None:
    response = httpx.get(url, headers={"Range": "bytes=0-9"})
    assert response.status_code == 206
    assert response.content == CONTENT[:10]
    assert response.headers["content-range"] == f"bytes 0-9/{len(CONTENT)}"
    assert response.headers["content-length"] == "10"


def test_a_resumed_download_gets_the_rest(url: str) -> None:
    start = len(CONTENT) // 2
    response = httpx.get(url, headers={"Range": f"bytes={start}-"})
    assert response.status_code == 206
    assert response.content == CONTENT[start:]
    assert response.headers["content-range"] == f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}"


def test_a_suffix_range_is_the_last_bytes(url: str) -> None:
    response = httpx.get(url, headers={"Range": "bytes=-5"})
    assert response.status_code == 206
    assert response.content == CONTENT[-5:]
    size = len(CONTENT)
    assert response.headers["content-range"] == f"bytes {size - 5}-{size - 1}/{size}"


# Both backends: tampered, moved, expired, foreign and deleted URLs


def _flipped(value: str) -> str:
    return value[:-1] + ("0" if value[-1] != "0" else "1")


def _tampered_signature(url: str, names: Signed) -> str:
    return with_query(
        url,
        [
            (name, _flipped(value) if name == names.signature else value)
            for name, value in query_of(url)
        ],
    )


def _tampered_expiry(url: str, names: Signed) -> str:
    return with_query(
        url,
        [
            (name, str(int(value) + 1) if name == names.expiry else value)
            for name, value in query_of(url)
        ],
    )


def _stripped_signature(url: str, names: Signed) -> str:
    return with_query(
        url, [(name, value) for name, value in query_of(url) if name != names.signature]
    )


def _no_query(url: str, names: Signed) -> str:
    return with_query(url, [])


def _added_parameter(url: str, names: Signed) -> str:
    return with_query(url, [*query_of(url), ("download", "1")])


def _doubled_signature(url: str, names: Signed) -> str:
    signature = dict(query_of(url))[names.signature]
    return with_query(url, [*query_of(url), (names.signature, signature)])


@pytest.mark.parametrize(
    ("tamper", "s3_answer"),
    [
        pytest.param(_tampered_signature, (403, "SignatureDoesNotMatch"), id="signature"),
        pytest.param(_tampered_expiry, (403, "SignatureDoesNotMatch"), id="expiry"),
        # SeaweedFS takes a presigned URL without its signature for a malformed request.
        pytest.param(_stripped_signature, (400, "MissingFields"), id="stripped"),
        pytest.param(_no_query, (403, "AccessDenied"), id="no-query"),
        pytest.param(_added_parameter, (403, "SignatureDoesNotMatch"), id="added-parameter"),
        pytest.param(_doubled_signature, None, id="doubled-signature"),
    ],
)
def test_a_tampered_url_is_refused(
    server: RunningServer,
    url: str,
    tamper: Callable[[str, Signed], str],
    s3_answer: tuple[int, str] | None,
) -> None:
    assert httpx.get(url).status_code == 200
    if server.serves_downloads:
        status, s3_code = 403, ""
    elif s3_answer is None:
        pytest.skip("SeaweedFS reads the first of two identical, valid signatures: nothing opens")
    else:
        status, s3_code = s3_answer
    response = httpx.get(tamper(url, signed_names(server)))
    assert_download_refused(server, response, status, local="invalid_signature", s3=s3_code)
    assert CONTENT not in response.content


def test_a_signature_does_not_open_another_bundle(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    release(client, project)
    url = download_url(client, project)
    release(client, project, make_zip({"other.json": "{}"}))
    other_url = download_url(client, project)
    assert "/v1.zip?" in url
    assert "/v2.zip?" in other_url
    assert httpx.get(other_url).status_code == 200

    moved = url.replace("/v1.zip?", "/v2.zip?")
    response = httpx.get(moved)
    assert_download_refused(
        server, response, 403, local="invalid_signature", s3="SignatureDoesNotMatch"
    )


def test_a_signature_does_not_open_another_projects_bundle(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    release(client, project)
    url = download_url(client, project)
    other = new_project(server.db)
    release(client, other)
    moved = url.replace(str(project.id), str(other.id))
    assert moved != url
    response = httpx.get(moved)
    assert_download_refused(
        server, response, 403, local="invalid_signature", s3="SignatureDoesNotMatch"
    )


def test_an_expired_url_is_403(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    key = release(client, project)["storage_path"]
    if server.serves_downloads:
        expired = server.base_url + signed_path(
            server.settings.secret_key, key, ttl_seconds=60, now=time.time() - 3600
        )
    else:
        # A SigV4 URL signs its own date and lifetime, so only waiting makes one expire.
        # X-Amz-Date has whole seconds: a 1 s URL is dead at most 1 s after signing.
        signed_at = time.monotonic()
        expired = server.store.download_url(key, ttl_seconds=1)
        time.sleep(max(0.0, signed_at + 2.2 - time.monotonic()))
    response = httpx.get(expired)
    assert_download_refused(server, response, 403, local="url_expired", s3="AccessDenied")
    if not server.serves_downloads:
        assert "Request has expired" in response.text
    # The same key signed now opens, so it is the expiry, not the signature, that refuses.
    fresh = httpx.get(server.store.download_url(key, ttl_seconds=60))
    assert fresh.status_code == 200
    assert fresh.content == CONTENT


def test_a_url_expires_after_the_configured_ttl(
    server_factory: Callable[..., RunningServer],
) -> None:
    short = server_factory(url_ttl_seconds=60)
    project = new_project(short.db)
    with httpx.Client(base_url=short.base_url, timeout=30) as client:
        release(client, project)
        before = time.time()
        url = download_url(client, project)
        after = time.time()
    assert before + 60 - 2 <= expires_at(short, url) <= after + 60 + 1
    assert httpx.get(url).status_code == 200


def test_only_short_urls_have_their_signature_remembered() -> None:
    """Signatures of the URLs handed out are remembered (devices reuse them); a made-up long
    one is checked all the same, and not remembered, so such URLs cannot fill memory."""
    from koolbase_ota.storage import signing

    secret = "a secret key of at least 32 characters"
    path, _, query_string = signed_path(secret, "ota/p/v1.zip", ttl_seconds=60).partition("?")
    query = parse_qsl(query_string)
    assert signing.verify(secret, path, query) is None
    remembered = signing._remembered_sign.cache_info().currsize
    long_query = [("expires", "9" * 12), ("x", "a" * 4000), ("signature", "0" * 64)]
    assert signing.verify(secret, DOWNLOAD_PREFIX + "ota/x.zip", long_query) == "invalid_signature"
    assert signing._remembered_sign.cache_info().currsize == remembered
    assert signing.verify(secret, path, query) is None


def test_downloads_sent_by_the_server_are_counted_in_metrics(tmp_path: Path) -> None:
    """Sent in front of the framework, and counted in batches: /metrics still shows each one
    under the route, with its status, and in the latency histogram.

    On a server process of its own, counted from zero: the metrics are the process's, and
    every server this test process runs counts into them. A download another test's server
    counted late (each adds its batch when its cache's refresh loop next comes round) now and
    then arrived in the middle of this test and failed it."""
    with serving(tmp_path / "data", "download-metrics") as server:
        credentials = server.credentials()
        project = Project(
            id=uuid.UUID(credentials["project_id"]),
            token=credentials["dashboard_token"],
            token_id=uuid.uuid4(),  # not used: the token is what the routes read
            keys=credentials["public_keys"],
        )
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            release(client, project)
            url = download_url(client, project)

            def counts() -> tuple[float, float, float]:
                found = [0.0, 0.0, 0.0]
                for line in client.get("/metrics").text.splitlines():
                    if 'route="/v1/downloads/{key:path}"' not in line:
                        continue
                    value = float(line.rsplit(" ", 1)[1])
                    requests = line.startswith("koolbase_ota_requests_total{")
                    if requests and 'status="200"' in line:
                        found[0] += value
                    elif requests and 'status="206"' in line:
                        found[1] += value
                    elif line.startswith("koolbase_ota_request_duration_seconds_count{"):
                        found[2] += value
                return found[0], found[1], found[2]

            assert counts() == (0, 0, 0)
            for _ in range(2):
                assert httpx.get(url).status_code == 200
            assert httpx.get(url, headers={"Range": "bytes=0-9"}).status_code == 206
            # A download is counted when its sending ends, which may be just after its client
            # has every byte, and on a loaded host came later than the 1 s of a change.
            eventually(lambda: counts() == (2, 1, 3), "counting the downloads", within=10)
            time.sleep(0.5)  # two refresh loops: nothing is counted twice
            assert counts() == (2, 1, 3)


def test_a_url_signed_with_another_secret_is_403(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    key = release(client, project)["storage_path"]
    # The same store with other credentials: our HMAC key locally, the S3 secret key on S3.
    impostor = open_store(
        server.settings.model_copy(
            update={
                "secret_key": "another secret key of at least 32 chars",
                "aws_secret_access_key": "not-the-secret-access-key",
            }
        )
    )
    response = httpx.get(impostor.download_url(key, ttl_seconds=60))
    assert_download_refused(
        server, response, 403, local="invalid_signature", s3="SignatureDoesNotMatch"
    )


def test_a_url_of_a_deleted_bundle_is_404(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    bundle = release(client, project)
    url = download_url(client, project)
    assert httpx.get(url).status_code == 200
    deleted = client.delete(project.path(f"/bundles/{bundle['id']}"), headers=project.auth)
    assert deleted.status_code == 204
    response = httpx.get(url)
    assert_download_refused(server, response, 404, local="bundle_not_found", s3="NoSuchKey")


# The embedded default only: the download route of this server


def test_get_serves_the_bundle_as_a_zip(embedded: RunningServer, url: str) -> None:
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-length"] == str(len(CONTENT))
    assert response.headers["etag"] == f'"{hashlib.sha256(CONTENT).hexdigest()}"'


def test_head_has_the_headers_and_no_body(embedded: RunningServer, url: str) -> None:
    get = httpx.get(url)
    head = httpx.head(url)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == "application/zip"
    assert head.headers["content-length"] == str(len(CONTENT))
    assert head.headers["etag"] == get.headers["etag"]


def test_head_of_a_deleted_bundle_is_404(
    embedded: RunningServer, client: httpx.Client, project: Project
) -> None:
    bundle = release(client, project)
    url = download_url(client, project)
    assert httpx.head(url).status_code == 200
    deleted = client.delete(project.path(f"/bundles/{bundle['id']}"), headers=project.auth)
    assert deleted.status_code == 204
    assert httpx.head(url).status_code == 404
