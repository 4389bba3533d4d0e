"""An adversarial review of the two SDK checks: each case here was answered wrongly, or
differently by different paths, before its fix. Real servers, real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from koolbase_ota.bundles import targeting
from koolbase_ota.sdk.check import CHECK_PATH
from koolbase_ota.sdk.codepush import CODE_PUSH_PATH
from tests.api.release import release
from tests.conftest import Project, RunningServer
from tests.test_e2e import Server
from tests.test_hostile_requests import raw_request
from tests.test_rsgi import published_on

#: The check paths with one letter percent-encoded: the app's bare endpoint answers them, not
#: the warm path inside the HTTP parser.
THROUGH_APP = {path: path.replace("check", "%63heck") for path in (CHECK_PATH, CODE_PUSH_PATH)}
QUERIES = {CHECK_PATH: "?channel=production&version=0", CODE_PUSH_PATH: "?channel=production"}


# Every interface `serve` runs: uvicorn with our protocol, granian on ASGI and on RSGI.


@dataclass
class Served:
    server: Server
    interface: str
    key: str


@pytest.fixture(scope="module", params=["uvicorn", "asgi", "rsgi"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """`serve` on each interface with a released bundle (test_rsgi's), and its key."""
    with published_on(tmp_path_factory, request.param, "review") as published:
        server = published.server
        yield Served(server, published.interface, server.credentials()["public_keys"]["production"])


# The key is the header's value without the whitespace around it.


@pytest.mark.parametrize("path", [CHECK_PATH, CODE_PUSH_PATH], ids=["seed", "code-push"])
@pytest.mark.parametrize("padding", [" ", "\t", " \t "], ids=["space", "tab", "mixed"])
def test_whitespace_after_the_key_is_not_the_keys_on_any_interface(
    served: Served, path: str, padding: str
) -> None:
    """RFC 9110 5.5: whitespace around a field value is not part of it. granian drops it and
    answered with the offer; llhttp keeps what trails, and uvicorn (warm path and app alike)
    answered 401 `invalid_api_key`: one request, two answers, by the server it reached."""
    base = served.server.base_url
    expected = raw_request(base, "GET", path + QUERIES[path], [("x-api-key", served.key)])
    assert expected.status == 200, expected.body
    for target in (path, THROUGH_APP[path]):
        for _ in range(2):  # the first may be cold; then the cached answer
            padded = raw_request(
                base, "GET", target + QUERIES[path], [("x-api-key", served.key + padding)]
            )
            assert (padded.status, padded.body) == (expected.status, expected.body), (
                served.interface,
                target,
            )


def test_a_key_of_only_whitespace_is_a_missing_key(served: Served) -> None:
    answer = raw_request(served.server.base_url, "GET", CHECK_PATH, [("x-api-key", " \t ")])
    assert answer.status == 401
    assert answer.json()["code"] == "missing_api_key"


@pytest.mark.parametrize("path", [CHECK_PATH, CODE_PUSH_PATH], ids=["seed", "code-push"])
def test_a_padded_key_is_read_alike_on_every_path_of_the_default_server(
    server: RunningServer, client: httpx.Client, project: Project, path: str
) -> None:
    """The same on both backends, through the warm path (parsed, replayed and read without
    the parser), the app's bare endpoint, and after the key's project is cached."""
    release(client, project)
    key = project.keys["production"]
    plain = client.get(path + QUERIES[path], headers={"x-api-key": key})
    assert plain.status_code == 200, plain.text
    for target in (path, THROUGH_APP[path]):
        for headers in (
            [("x-api-key", key + " ")],
            [("x-api-key", key + "\t"), ("X-Request-Id", "unique-1")],
            [("x-api-key", "pk_live_" + "0" * 24), ("x-api-key", key + "  ")],
        ):
            for _ in range(3):
                answer = raw_request(server.base_url, "GET", target + QUERIES[path], headers)
                assert (answer.status, answer.body) == (200, plain.content), (target, headers)


# A device's app version is refused by its length before its parse is kept.


@pytest.mark.parametrize("path", [CHECK_PATH, CODE_PUSH_PATH], ids=["seed", "code-push"])
def test_an_app_version_longer_than_any_valid_one_is_refused_and_not_kept(
    server: RunningServer, client: httpx.Client, project: Project, path: str
) -> None:
    """The kept parses of `app_version` (1,024 of them) held every text they were asked
    about: as long as a request head (64 KiB) each, 64 MiB per process for anyone with the
    app's public key. A text longer than the longest valid one (91 characters) is refused
    without being kept; the longest valid one still matches."""
    release(client, project)
    longest = "999999.999999.999999.999999-" + "x" * 63
    assert len(longest) == 91
    params = {"channel": "production", "app_version": longest}
    ok = client.get(path, params=params, headers=project.key())
    assert ok.status_code == 200, ok.text
    kept = targeting.device_app_version.cache_info()
    for n in range(3):
        long = f"1.{n}-{project.id.hex}" + "x" * 60_000
        params = {"channel": "production", "app_version": long}
        refused = client.get(path, params=params, headers=project.key())
        assert refused.status_code == 400, refused.text
        assert refused.json()["code"] == "invalid_app_version"
    assert targeting.device_app_version.cache_info().misses == kept.misses
