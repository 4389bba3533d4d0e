"""Wire conformance: claims of `seed/ota-api.txt` and `COMPAT.md` the rest of the suite left
unchecked, each held against a real server, on every path that answers the checks."""

from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from fastapi import FastAPI

from koolbase_ota.sdk.check import CHECK_PATH
from koolbase_ota.sdk.codepush import CODE_PUSH_PATH
from tests.api.release import add_stable, release
from tests.conftest import (
    Project,
    RunningServer,
    assert_error,
    released,
    upload,
    uploaded,
)
from tests.test_hostile_requests import Answer, raw_request

#: The check paths with one letter percent-encoded: not the raw path the warm path matches,
#: so the app's bare endpoint answers them.
THROUGH_APP = {path: path.replace("check", "%63heck") for path in (CHECK_PATH, CODE_PUSH_PATH)}
UNKNOWN_KEY = "pk_live_" + "0" * 24


def through_route(server: RunningServer, target: str, headers: list[tuple[str, str]]) -> Answer:
    """The same GET answered by the FastAPI route alone (the app answers it in front)."""
    app = server.app

    async def framework_only(scope: Any, receive: Any, send: Any) -> None:
        await FastAPI.__call__(app, scope, receive, send)

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=framework_only)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as route:
            return await route.get(target, headers=headers)

    response = asyncio.run(ask())
    return Answer(response.status_code, dict(response.headers), response.content)


def without_date(answer: Answer) -> dict[str, str]:
    return {name: value for name, value in answer.headers.items() if name != "date"}


@pytest.mark.parametrize("path", [CHECK_PATH, CODE_PUSH_PATH], ids=["seed", "code-push"])
@pytest.mark.parametrize("good_last", [True, False], ids=["key-last", "key-first"])
def test_a_repeated_x_api_key_is_read_alike_by_the_warm_path_the_endpoint_and_the_route(
    server: RunningServer, client: httpx.Client, project: Project, path: str, good_last: bool
) -> None:
    """COMPAT "the fast path and the FastAPI route must give byte-identical answers" (brief),
    for the header the seed's SDK endpoint requires ("Requires the environment public key via
    x-api-key header"): a request with two of them gets the same answer from the warm path,
    the bare endpoint and the documented route. The route's `APIKeyHeader` read the first,
    the other two the last: a 401 on one and an offer on the other."""
    release(client, project)
    pair = [("x-api-key", UNKNOWN_KEY), ("x-api-key", project.keys["production"])]
    headers = pair if good_last else pair[::-1]
    query = "?channel=production"
    for _ in range(2):  # the first may be cold; the second is the warm path's
        warm = raw_request(server.base_url, "GET", path + query, headers)
    endpoint = raw_request(server.base_url, "GET", THROUGH_APP[path] + query, headers)
    route = through_route(server, path + query, headers)
    # The last one counts, as on the warm path (`httpserver`, which this review leaves alone).
    assert warm.status == (200 if good_last else 401), warm.body
    for other in (endpoint, route):
        assert (other.status, other.body) == (warm.status, warm.body)
        assert without_date(other) == without_date(warm)


def test_non_ascii_release_notes_reach_a_latin1_decoding_client_intact(
    client: httpx.Client, project: Project
) -> None:
    """COMPAT: the SDK reads `release_notes: String?`. The answer is `application/json` with no
    charset, which Dart's package:http decoded as Latin-1 until 2025 (dart-lang/http#175,
    fixed by #1422): sent as raw UTF-8, "Mise à jour" reached the apps as "Mise Ã  jour".
    Every check answer is ASCII, so any decoding reads the notes as written."""
    notes = "Mise à jour: 新しいバナー 🚀"
    released(client, project, release_notes=notes)
    for path, params in ((CHECK_PATH, {"version": 0}), (CODE_PUSH_PATH, {"current_bundle": 0})):
        for _ in range(2):  # cold, then warm
            response = client.get(
                path, params={"channel": "production", **params}, headers=project.key()
            )
            assert response.status_code == 200, response.text
            assert response.content.isascii(), response.content
    seed = client.get(CHECK_PATH, params={"version": 0}, headers=project.key())
    assert json.loads(seed.content.decode("latin-1"))["release_notes"] == notes


def test_a_local_header_name_that_leaves_the_bundle_folder_is_refused(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    """COMPAT: the SDK "unzips every entry to <app documents>/koolbase_ota_bundle/<entry name>
    with no guard against ../": an unzipper that takes names from the local headers (as
    streaming ones do) must not find a `../` the central directory hides."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("aaaaaaaaaa.json", b"{}")
    data = bytearray(buffer.getvalue())
    assert data[30:45] == b"aaaaaaaaaa.json"  # the first local header's name
    data[30:45] = b"../../evil.json"  # the same length: the layout still adds up
    before = server.stored_keys()
    assert_error(upload(client, project, bytes(data)), 422, "invalid_zip")
    assert client.get(project.path("/bundles"), headers=project.auth).json() == []
    assert server.stored_keys() == before
    assert uploaded(client, project)["version"] == 1


def test_empty_channel_and_version_parameters_take_their_defaults(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    """ota-api.txt: channel "Defaults to production"; COMPAT: `version` is 0 when the device
    has none, the code-push `channel` defaults to `stable` and `current_bundle` is 0 for none.
    A parameter sent empty (`channel=`) is a default too, not an unknown channel."""
    production = released(client, project)
    seed = client.get(CHECK_PATH + "?channel=&version=0", headers=project.key())
    assert seed.status_code == 200, seed.text
    assert seed.json()["version"] == production["version"]
    add_stable(server, project)
    stable = release(client, project, channel="stable")  # its activation refreshes the cache
    push = client.get(CODE_PUSH_PATH + "?channel=&current_bundle=", headers=project.key())
    assert push.status_code == 200, push.text
    assert push.json()["status"] == "update_available"
    assert push.json()["bundle"]["bundle_id"] == stable["id"]


@pytest.mark.parametrize("platform", ["react-native", "flutter", "Android"])
def test_the_code_push_fallback_platforms_are_checks_not_errors(
    client: httpx.Client, project: Project, platform: str
) -> None:
    """COMPAT: `platform` is ios or android, but "a fallback value such as `flutter` or
    `react-native` can appear": such a device gets the bundles for every platform, never a 400
    (which the client takes as "no update" for good)."""
    everyone = release(client, project)
    release(client, project, platform="ios")
    response = client.get(
        CODE_PUSH_PATH,
        params={"channel": "production", "platform": platform, "app_version": "2.4.1"},
        headers=project.key(),
    )
    assert response.status_code == 200, response.text
    assert response.json()["bundle"]["version"] == everyone["version"]


def test_download_urls_expire_after_one_hour_by_default(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    """COMPAT: "Download URLs are presigned and expire after one hour by default" (handed out
    for reuse up to half of it); ota-api.txt: a bundle is "Max 50MB"."""
    assert server.settings.url_ttl_seconds == 3600
    assert server.settings.max_bundle_bytes == 50 * 1024 * 1024
    released(client, project)
    url = client.get(CHECK_PATH, headers=project.key()).json()["download_url"]
    query = parse_qs(urlparse(url).query)
    if "expires" in query:
        remaining = int(query["expires"][0]) - time.time()
    else:
        signed_at = time.mktime(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
        remaining = signed_at - time.timezone + int(query["X-Amz-Expires"][0]) - time.time()
    assert 1800 - 5 <= remaining <= 3600 + 1
