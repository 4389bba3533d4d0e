"""Optional keyset pagination of the bundle list: `?limit=&cursor=`, `X-Next-Cursor`, `Link`."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from tests.conftest import Project, RunningServer, assert_error, new_project, uploaded

Bundle = dict[str, Any]
#: Seven bundles over the three channels, uploaded in an order unlike the list's.
SEED = (
    "production",
    "staging",
    "development",
    "production",
    "staging",
    "production",
    "development",
)


def seed(client: httpx.Client, project: Project) -> None:
    for channel in SEED:
        uploaded(client, project, channel=channel)


def whole(client: httpx.Client, project: Project) -> list[Bundle]:
    response = client.get(project.path("/bundles"), headers=project.auth)
    assert response.status_code == 200, response.text
    assert "x-next-cursor" not in response.headers
    assert "link" not in response.headers
    body: list[Bundle] = response.json()
    return body


def page(
    client: httpx.Client, server: RunningServer, project: Project, **params: str | int
) -> tuple[list[Bundle], str | None]:
    """One page and its next cursor; checks that `Link` agrees with `X-Next-Cursor`."""
    response = client.get(project.path("/bundles"), headers=project.auth, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    cursor = response.headers.get("x-next-cursor")
    if cursor is None:
        assert "link" not in response.headers
    else:
        size = params.get("limit", 100)
        query = urlencode({"limit": size, "cursor": cursor})
        next_url = f"{server.settings.public_url}{project.path('/bundles')}?{query}"
        assert response.headers["link"] == f'<{next_url}>; rel="next"'
    body: list[Bundle] = response.json()
    return body, cursor


def walk(
    client: httpx.Client, server: RunningServer, project: Project, limit: int
) -> list[list[Bundle]]:
    pages: list[list[Bundle]] = []
    cursor: str | None = ""
    while cursor is not None:
        items, cursor = page(client, server, project, limit=limit, cursor=cursor)
        assert 0 < len(items) <= limit
        pages.append(items)
    return pages


def test_pages_concatenate_to_the_whole_list(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    seed(client, project)
    full = whole(client, project)
    assert [(b["channel"], b["version"]) for b in full] == [
        ("development", 2),
        ("development", 1),
        ("production", 3),
        ("production", 2),
        ("production", 1),
        ("staging", 2),
        ("staging", 1),
    ]
    for limit in range(1, 9):
        pages = walk(client, server, project, limit)
        assert [bundle for items in pages for bundle in items] == full, limit
        # Full pages but the last; an exact fit ends without an empty page or a next cursor.
        assert len(pages) == -(-len(full) // limit), limit
        assert all(len(items) == limit for items in pages[:-1]), limit

    # `limit` alone is the first page; the largest allowed limit answers everything at once.
    first, cursor = page(client, server, project, limit=3)
    assert first == full[:3]
    assert cursor is not None
    assert page(client, server, project, limit=1000) == (full, None)

    # The Link header is a URL to follow as it is.
    response = client.get(
        client.get(project.path("/bundles"), headers=project.auth, params={"limit": 3})
        .headers["link"]
        .split(">")[0]
        .lstrip("<"),
        headers=project.auth,
    )
    assert response.status_code == 200, response.text
    assert response.json() == full[3:6]

    # A cursor alone pages by the default of 100; an empty cursor means the first page.
    assert page(client, server, project, cursor=cursor) == (full[3:], None)
    assert page(client, server, project, cursor="") == (full, None)


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "", "abc", "1.5", " 5", "+5", "5_0", "1e3"])
def test_bad_limit_is_refused(client: httpx.Client, project: Project, limit: str) -> None:
    response = client.get(project.path("/bundles"), headers=project.auth, params={"limit": limit})
    assert_error(response, 400, "invalid_limit")


def test_the_token_is_checked_before_the_limit(client: httpx.Client, project: Project) -> None:
    assert_error(client.get(project.path("/bundles"), params={"limit": "abc"}), 401)


def _b64(raw: bytes, *, padded: bool = False) -> str:
    text = base64.urlsafe_b64encode(raw).decode()
    return text if padded else text.rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "%%%",
        "é",
        "A" * 1000,
        _b64(b"production"),
        _b64(b'{"channel":"production","version":2}'),
        _b64(b'["production"]'),
        _b64(b'["production","2"]'),
        _b64(b'["production",2,1]'),
        _b64(b'["production",-1]'),
        _b64(b'["production",true]'),
        _b64(b'["production",2.0]'),
        _b64(b'["",2]'),
        _b64(b'["production",99999999999]'),
        _b64(b'["production", 2]'),  # not the exact form the server hands out
        _b64(b'["production",2]', padded=True),
        _b64(b"\xff\xfe"),
    ],
)
def test_bad_cursor_is_refused(client: httpx.Client, project: Project, cursor: str) -> None:
    for params in ({"cursor": cursor}, {"cursor": cursor, "limit": "2"}):
        response = client.get(project.path("/bundles"), headers=project.auth, params=params)
        assert_error(response, 400, "invalid_cursor")


def test_tampered_cursor_is_refused(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    uploaded(client, project)
    uploaded(client, project)
    _, cursor = page(client, server, project, limit=1)
    assert cursor is not None
    for tampered in (cursor[:-1], cursor + "A", "X" + cursor[1:], cursor[:5] + "+" + cursor[6:]):
        response = client.get(
            project.path("/bundles"), headers=project.auth, params={"limit": 1, "cursor": tampered}
        )
        assert_error(response, 400, "invalid_cursor")


def test_a_cursor_is_only_a_position_in_the_callers_project(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    uploaded(client, project, channel="development")
    uploaded(client, project, channel="development")
    uploaded(client, project, channel="staging")
    _, cursor = page(client, server, project, limit=1)
    assert cursor is not None

    other = new_project(server.db, "other")
    assert page(client, server, other, limit=10, cursor=cursor) == ([], None)
    mine = uploaded(client, other, channel="staging")
    items, next_cursor = page(client, server, other, limit=10, cursor=cursor)
    assert [bundle["id"] for bundle in items] == [mine["id"]]
    assert next_cursor is None


def test_deleting_between_pages_neither_repeats_nor_skips(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    seed(client, project)
    full = whole(client, project)
    first, cursor = page(client, server, project, limit=3)
    assert first == full[:3]
    # Delete the bundle the cursor points after, and the one that would open the next page.
    for bundle in (full[2], full[3]):
        response = client.delete(project.path(f"/bundles/{bundle['id']}"), headers=project.auth)
        assert response.status_code == 204, response.text
    rest: list[Bundle] = []
    while cursor is not None:
        items, cursor = page(client, server, project, limit=3, cursor=cursor)
        rest.extend(items)
    assert rest == full[4:]


def test_openapi_documents_the_parameters_and_headers(client: httpx.Client) -> None:
    operation = client.get("/openapi.json").json()["paths"][
        "/v1/projects/{project_id}/ota/bundles"
    ]["get"]
    parameters = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
    assert set(parameters) == {"limit", "cursor"}
    for parameter in parameters.values():
        assert parameter["required"] is False
        assert parameter["description"]
    limit_schema = parameters["limit"]["schema"]["anyOf"][0]
    assert limit_schema == {"type": "integer", "minimum": 1, "maximum": 1000}
    ok = operation["responses"]["200"]
    assert set(ok["headers"]) == {"X-Next-Cursor", "Link"}
    assert ok["content"]["application/json"]["schema"]["type"] == "array"
    assert operation["responses"]["400"]
