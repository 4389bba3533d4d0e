"""`serve` on granian's RSGI interface answers as the plain ASGI app does, and as uvicorn
with our protocol (the default) does.

Signed downloads are sent from Rust (files and single ranges); everything else goes through
the RSGI-to-ASGI bridge in `koolbase_ota.rsgi`. Each case runs against a real `serve` in every
mode, so any difference between them is a failure here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.test_e2e import Server, auth, serving
from tests.test_hostile_requests import raw_request

SECURITY_HEADERS = ("x-content-type-options", "x-frame-options", "content-security-policy")


@dataclass
class Published:
    server: Server
    interface: str
    url: str
    content: bytes
    bundle_id: str


def publish(server: Server, interface: str) -> Published:
    """Upload and activate a bundle of random bytes on `server`; its download URL."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("payload.bin", os.urandom(300_000))
    content = buffer.getvalue()
    credentials = server.credentials()
    api = f"{server.base_url}/v1/projects/{credentials['project_id']}/ota"
    token = auth(credentials["dashboard_token"])
    with httpx.Client(timeout=30) as client:
        uploaded = client.post(
            f"{api}/upload",
            headers=token,
            files={"bundle": ("bundle.zip", content, "application/zip")},
        )
        assert uploaded.status_code == 201, uploaded.text
        bundle_id = uploaded.json()["id"]
        activated = client.post(f"{api}/bundles/{bundle_id}/activate", headers=token)
        assert activated.status_code == 200, activated.text
        check = client.get(
            f"{server.base_url}/v1/sdk/ota/check",
            params={"version": 0},
            headers={"x-api-key": credentials["public_keys"]["production"]},
        )
    assert check.status_code == 200, check.text
    return Published(server, interface, check.json()["download_url"], content, bundle_id)


@contextlib.contextmanager
def published_on(
    tmp_path_factory: pytest.TempPathFactory, interface: str, label: str
) -> Iterator[Published]:
    """`serve` on `interface`, in a data dir and log named after `label`, with a bundle
    published."""
    data_dir: Path = tmp_path_factory.mktemp(f"{label}-{interface}") / "data"
    env = {"KOOLBASE_OTA_SERVER_INTERFACE": interface}
    with serving(data_dir, f"{label}-{interface}", env=env) as server:
        yield publish(server, interface)


@pytest.fixture(scope="module", params=["rsgi", "asgi", "uvicorn"])
def published(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Published]:
    with published_on(tmp_path_factory, request.param, "serve") as served:
        yield served


def _get(url: str, **headers: str) -> httpx.Response:
    return httpx.get(url, headers=headers, timeout=30)


def test_a_whole_file_has_its_length_headers_and_bytes(published: Published) -> None:
    response = _get(published.url)
    assert response.status_code == 200
    assert response.content == published.content
    assert response.headers["content-length"] == str(len(published.content))
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["etag"].startswith('"')
    assert "last-modified" in response.headers
    for name in SECURITY_HEADERS:
        assert name in response.headers


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=100-199", 100, 200), ("bytes=-10", -10, None), ("bytes=299990-", 299990, None)],
)
def test_a_single_range_is_exactly_those_bytes(
    published: Published, header: str, start: int, end: int | None
) -> None:
    expected = published.content[start:end]
    response = _get(published.url, Range=header)
    assert response.status_code == 206
    assert response.content == expected
    assert response.headers["content-length"] == str(len(expected))
    first = start % len(published.content)
    assert response.headers["content-range"] == (
        f"bytes {first}-{first + len(expected) - 1}/{len(published.content)}"
    )


def test_ranges_the_fast_path_leaves_to_the_app_are_still_answered(
    published: Published,
) -> None:
    several = _get(published.url, Range="bytes=0-1,10-11")
    assert several.status_code == 206
    assert several.headers["content-type"].startswith("multipart/byteranges")
    unsatisfiable = _get(published.url, Range=f"bytes={len(published.content) + 5}-")
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.json()["code"] == "range_not_satisfiable"
    stale = _get(published.url, Range="bytes=0-9", **{"If-Range": '"not-the-etag"'})
    assert stale.status_code == 200
    assert stale.content == published.content


@pytest.mark.parametrize(
    ("headers", "status", "part"),
    [
        # A unit the server does not know: the Range is ignored (RFC 9110 14.2).
        ([("Range", "items=0-5")], 200, None),
        # An invalid range set: 416, as JSON like every error (Starlette's was plain text).
        ([("Range", "bytes=5-3")], 416, None),
        ([("Range", "bytes=abc")], 416, None),
        ([("Range", "bytes=")], 416, None),
        # A set with one satisfiable part is satisfiable: that part.
        ([("Range", "bytes=0-0,999999999-")], 206, (0, 1)),
        # Two Range headers: the first, on every path.
        ([("Range", "bytes=0-9"), ("Range", "bytes=20-29")], 206, (0, 10)),
        # An If-Range that does not match: the whole file, whatever the Range says.
        ([("Range", "bytes=5-3"), ("If-Range", '"not-the-etag"')], 200, None),
    ],
    ids=["unknown-unit", "backwards", "not-numbers", "empty", "one-part-within", "two", "if-range"],
)
def test_ranges_are_read_as_rfc_9110_reads_them(
    published: Published,
    headers: list[tuple[str, str]],
    status: int,
    part: tuple[int, int] | None,
) -> None:
    response = httpx.get(published.url, headers=headers, timeout=30)
    assert response.status_code == status
    size = len(published.content)
    if status == 416:
        assert response.json()["code"] == "range_not_satisfiable"
        assert response.headers["content-range"] == f"bytes */{size}"
    elif part is None:
        assert response.content == published.content
    else:
        assert response.content == published.content[part[0] : part[1]]
        assert response.headers["content-range"] == f"bytes {part[0]}-{part[1] - 1}/{size}"
        assert "last-modified" in response.headers


def test_a_path_encoded_twice_is_decoded_once(published: Published) -> None:
    """`%256F` is `%6F`, not `o`: granian's RSGI path is already decoded, and decoding it
    again served the file under a path that was never signed."""
    twice = published.url.replace("/v1/downloads/ota/", "/v1/downloads/%256Fta/")
    assert twice != published.url
    response = _get(twice)
    assert response.status_code == 403
    assert response.json()["code"] == "invalid_signature"


def test_head_tells_the_length_without_a_body(published: Published) -> None:
    response = httpx.head(published.url, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(published.content))
    assert response.content == b""


def test_refusals_are_the_apps_json_errors(published: Published) -> None:
    forged = _get(published.url.replace("signature=", "signature=0"))
    assert forged.status_code == 403
    assert forged.json() == {"error": "invalid download URL signature", "code": "invalid_signature"}
    unknown = _get(published.server.base_url + "/v1/downloads/ota/%C3%A9/x.zip?signature=a")
    assert unknown.status_code == 403
    assert unknown.json()["code"] == "invalid_signature"
    for name in SECURITY_HEADERS:
        assert name in forged.headers


def test_downloads_served_from_rust_are_counted_in_metrics(published: Published) -> None:
    before = _download_count(published.server.base_url)
    for _ in range(3):
        assert _get(published.url).status_code == 200
    assert _download_count(published.server.base_url) == before + 3


def _download_count(base_url: str) -> float:
    metrics = httpx.get(base_url + "/metrics", timeout=30).text
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("koolbase_ota_requests_total{") and (
            'route="/v1/downloads/{key:path}"' in line and 'status="200"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_deleted_bundle_stops_downloading(published: Published) -> None:
    credentials = published.server.credentials()
    api = f"{published.server.base_url}/v1/projects/{credentials['project_id']}/ota"
    token = auth(credentials["dashboard_token"])
    # Publish a second bundle to delete, so the module's bundle stays for the other cases.
    other = publish(published.server, published.interface)
    assert _get(other.url).status_code == 200
    deleted = httpx.delete(f"{api}/bundles/{other.bundle_id}", headers=token, timeout=30)
    assert deleted.status_code == 204
    gone = _get(other.url)
    assert gone.status_code == 404
    assert gone.json()["code"] == "bundle_not_found"
    # The bridge passes an upload's body and an empty answer through unchanged.
    assert _get(published.url).status_code == 200
    # The module's bundle is the channel's active one again for the cases after this one.
    again = httpx.post(f"{api}/bundles/{published.bundle_id}/activate", headers=token, timeout=30)
    assert again.status_code == 200


def test_the_check_answers_alike_in_both_modes(published: Published) -> None:
    server = published.server
    key = server.credentials()["public_keys"]["production"]
    url = server.base_url + "/v1/sdk/ota/check"
    offered = httpx.get(url, params={"version": 0}, headers={"x-api-key": key}, timeout=30)
    assert offered.status_code == 200
    assert offered.json()["has_update"] is True
    assert offered.headers["content-length"] == str(len(offered.content))
    assert offered.headers["cache-control"] == "no-store"
    current = offered.json()["version"]
    latest = httpx.get(url, params={"version": current}, headers={"x-api-key": key}, timeout=30)
    assert latest.content == b'{"has_update":false}'
    refusals = {
        "missing_api_key": httpx.get(url, timeout=30),
        "invalid_api_key": httpx.get(url, headers={"x-api-key": "pk_live_nope"}, timeout=30),
        "invalid_version": httpx.get(
            url, params={"version": "x"}, headers={"x-api-key": key}, timeout=30
        ),
        "invalid_channel": httpx.get(
            url, params={"channel": "nope"}, headers={"x-api-key": key}, timeout=30
        ),
    }
    for code, response in refusals.items():
        assert response.status_code in (400, 401), code
        assert response.json()["code"] == code
        for name in SECURITY_HEADERS:
            assert name in response.headers
    # A check with a body or another method is not the check: the app answers it.
    assert httpx.post(url, headers={"x-api-key": key}, timeout=30).status_code == 405


def test_the_code_push_check_answers_alike_in_both_modes(published: Published) -> None:
    server = published.server
    credentials = server.credentials()
    key = credentials["public_keys"]["production"]
    url = server.base_url + "/v1/code-push/check"
    query: dict[str, str | int] = {
        "app_version": "2.4.1",
        "platform": "ios",
        "device_id": "d-1",
        "current_bundle": 0,
    }
    # The default channel, stable, is the project's once it adds it.
    missing = httpx.get(url, params=query, headers={"x-api-key": key}, timeout=30)
    assert missing.status_code == 400
    assert missing.json()["code"] == "invalid_channel"
    offered = httpx.get(
        url, params={**query, "channel": "production"}, headers={"x-api-key": key}, timeout=30
    )
    assert offered.status_code == 200, offered.text
    body = offered.json()
    assert body["status"] == "update_available"
    assert body["bundle"]["bundle_id"] == published.bundle_id
    assert _get(body["bundle"]["download_url"]).content == published.content
    current = httpx.get(
        url,
        params={**query, "channel": "production", "current_bundle": body["bundle"]["version"]},
        headers={"x-api-key": key},
        timeout=30,
    )
    assert current.json() == {"status": "no_update"}
    unknown = httpx.get(url, params=query, headers={"x-api-key": "pk_live_nope"}, timeout=30)
    assert unknown.status_code == 401
    assert unknown.json()["code"] == "invalid_api_key"


def test_a_request_head_far_over_64_kib_is_431_on_every_interface(published: Published) -> None:
    """granian read heads of up to about a megabyte (its buffer, 408 KiB, and a read past it):
    a 300 KB header reached the app (found by comparing the interfaces, helper-41). Its buffer
    is now 64 KiB, which bounds a head at two to three times that (uvicorn's protocol, exactly
    64 KiB); its parser answers 431 itself, without a body."""
    health = published.server.base_url + "/healthz"
    assert _get(health, **{"x-big": "a" * 60_000}).status_code == 200
    refused = _get(health, **{"x-big": "a" * 300_000})
    assert refused.status_code == 431
    if published.interface == "uvicorn":
        assert refused.json()["code"] == "headers_too_large"


def test_the_checks_are_rate_limited_per_forwarded_address_on_rsgi(tmp_path: Path) -> None:
    """The RSGI path reads the client behind a trusted proxy the way the ASGI one does."""
    env = {
        "KOOLBASE_OTA_TRUSTED_PROXIES": "127.0.0.1",
        "KOOLBASE_OTA_CHECK_RATE_PER_ADDRESS": "0.001",  # no token comes back during the test
        "KOOLBASE_OTA_CHECK_BURST_PER_ADDRESS": "2",
    }
    with serving(tmp_path / "data", "serve-limited", env=env) as server:
        key = server.credentials()["public_keys"]["production"]
        seed = server.base_url + "/v1/sdk/ota/check"
        code_push = server.base_url + "/v1/code-push/check"

        def get(url: str, address: str) -> httpx.Response:
            headers = {"x-api-key": key, "x-forwarded-for": f"198.51.100.9, {address}"}
            return httpx.get(url, params={"channel": "production"}, headers=headers, timeout=30)

        assert get(seed, "203.0.113.50").status_code == 200
        assert get(code_push, "203.0.113.50").status_code == 200
        limited = get(seed, "203.0.113.50")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["code"] == "rate_limited"
        assert get(code_push, "203.0.113.50").status_code == 429
        # Another device behind the same proxy has its own allowance.
        assert get(seed, "203.0.113.51").status_code == 200


@pytest.mark.parametrize("path", ["/v1/sdk/ota/check", "/v1/code-push/check"])
def test_a_repeated_x_api_key_is_read_as_the_last_on_every_interface(
    published: Published, path: str
) -> None:
    """RSGI's `headers.get` gave the first key where the warm path takes the last, so the
    same request was an offer on uvicorn and a 401 on RSGI, and the other way round."""
    server = published.server
    key = server.credentials()["public_keys"]["production"]
    unknown = "pk_live_" + "0" * 24
    url = server.base_url + path + "?channel=production"
    with httpx.Client(timeout=30) as http:
        last = http.get(url, headers=[("x-api-key", unknown), ("x-api-key", key)])
        first = http.get(url, headers=[("x-api-key", key), ("x-api-key", unknown)])
    assert last.status_code == 200, last.text
    assert first.status_code == 401, first.text
    assert first.json()["code"] == "invalid_api_key"


@pytest.mark.parametrize("path", ["/v1/sdk/ota/check", "/v1/code-push/check"])
def test_a_key_that_is_not_utf8_is_invalid_on_every_interface(
    published: Published, path: str
) -> None:
    """granian leaves a header value that is not UTF-8 out of `get_all` but keeps its name:
    RSGI answered `missing_api_key` where the other interfaces answer `invalid_api_key`."""
    target = path + "?channel=production&version=0&current_bundle=0"
    key = published.server.credentials()["public_keys"]["production"]
    for sent in ("\xff\xfe", key[:-1] + "\xe9", key + "\xe9"):
        answer = raw_request(published.server.base_url, "GET", target, [("x-api-key", sent)])
        assert answer.status == 401, answer.body
        assert json.loads(answer.body)["code"] == "invalid_api_key"
    empty = raw_request(published.server.base_url, "GET", target, [("x-api-key", "")])
    assert json.loads(empty.body)["code"] == "missing_api_key"
    # The same requests with the key as sent by the SDK are answered.
    good = raw_request(published.server.base_url, "GET", target, [("x-api-key", key)])
    assert good.status == 200, good.body
