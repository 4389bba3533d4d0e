"""Keyset pages of the audit trail: `?limit=&cursor=`, `X-Next-Cursor` and `Link`, so that a
trail longer than the largest page (1,000 events) can be read to its first event."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from koolbase_ota import audit
from koolbase_ota.projects import service as projects
from tests.api.test_audit import audit_path, events
from tests.conftest import Project, RunningServer, assert_error, new_project

Event = dict[str, Any]


def page(
    client: httpx.Client, server: RunningServer, project: Project, **params: str | int
) -> tuple[list[Event], str | None]:
    """One page and its next cursor; checks that `Link` agrees with `X-Next-Cursor`."""
    response = client.get(audit_path(project), headers=project.auth, params=params)
    assert response.status_code == 200, response.text
    cursor = response.headers.get("x-next-cursor")
    if cursor is None:
        assert "link" not in response.headers
    else:
        query = urlencode({"limit": params.get("limit", audit.DEFAULT_LIMIT), "cursor": cursor})
        next_url = f"{server.settings.public_url}{audit_path(project)}?{query}"
        assert response.headers["link"] == f'<{next_url}>; rel="next"'
    body: list[Event] = response.json()
    return body, cursor


def walk(client: httpx.Client, server: RunningServer, project: Project, limit: int) -> list[Event]:
    """Every page from the newest event on, each full but the last."""
    found: list[Event] = []
    cursor: str | None = ""
    while cursor is not None:
        items, cursor = page(client, server, project, limit=limit, cursor=cursor)
        assert 0 < len(items) <= limit
        assert cursor is None or len(items) == limit
        found.extend(items)
    return found


def record(server: RunningServer, project: Project, count: int, at: dt.datetime) -> None:
    """`count` events written straight to the database, all at the same instant."""
    with server.db.write() as session:
        session.add_all(
            audit.AuditEvent(
                id=uuid.uuid4(),
                project_id=project.id,
                at=at,
                actor="cli",
                action="key.rotate",
                target=str(n),
                details="{}",
            )
            for n in range(count)
        )


def rotate(server: RunningServer, project: Project, times: int) -> None:
    for _ in range(times):
        projects.rotate_key(server.db, project_id=project.id, environment="development")


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8])
def test_pages_concatenate_to_the_whole_trail(
    client: httpx.Client, server: RunningServer, project: Project, limit: int
) -> None:
    rotate(server, project, 6)
    whole = events(client, project, limit="1000")
    assert len(whole) == 7

    assert walk(client, server, project, limit) == whole


def test_the_first_page_says_when_older_events_follow(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    rotate(server, project, 2)

    first, cursor = page(client, server, project, limit=2)
    assert cursor is not None
    rest, end = page(client, server, project, limit=2, cursor=cursor)
    assert [event["action"] for event in first + rest] == ["key.rotate"] * 2 + ["project.create"]
    assert end is None
    # A page that holds the whole trail says nothing more, with or without a limit.
    assert page(client, server, project)[1] is None
    assert page(client, server, project, limit=3)[1] is None


def test_a_trail_longer_than_the_largest_page_is_read_to_its_start(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    at = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
    record(server, project, audit.MAX_LIMIT + 4, at)

    trail = walk(client, server, project, audit.MAX_LIMIT)

    assert len(trail) == audit.MAX_LIMIT + 5  # and the project's creation
    assert trail[0]["action"] == "project.create"  # created now, after the recorded instant
    ids = [event["id"] for event in trail]
    assert len(set(ids)) == len(ids)
    assert sorted(event["target"] for event in trail[1:]) == sorted(
        str(n) for n in range(audit.MAX_LIMIT + 4)
    )


def test_events_of_one_instant_are_neither_repeated_nor_skipped(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    # A coarse clock gives many events one timestamp: pages must split them by id.
    record(server, project, 9, dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    whole = events(client, project, limit="1000")

    for limit in (1, 2, 4):
        assert walk(client, server, project, limit) == whole


def test_events_recorded_between_pages_do_not_shift_the_pages_after(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    rotate(server, project, 4)
    whole = events(client, project, limit="1000")
    first, cursor = page(client, server, project, limit=2)
    assert first == whole[:2]

    rotate(server, project, 3)  # newer than every event already listed
    rest: list[Event] = []
    while cursor is not None:
        items, cursor = page(client, server, project, limit=2, cursor=cursor)
        rest.extend(items)

    assert rest == whole[2:]


def _b64(raw: bytes, *, padded: bool = False) -> str:
    text = base64.urlsafe_b64encode(raw).decode()
    return text if padded else text.rstrip("=")


GOOD_STAMP = "2026-01-02T03:04:05.000006"
GOOD_ID = "0a1b2c3d4e5f40718293a4b5c6d7e8f9"


@pytest.mark.parametrize(
    "cursor",
    [
        "not base64!",
        "x" * 300,
        "é",
        _b64(b"not json"),
        _b64(b"{}"),
        _b64(b"[]"),
        _b64(json.dumps([GOOD_STAMP]).encode()),
        _b64(json.dumps([GOOD_STAMP, GOOD_ID, 1]).encode()),
        _b64(json.dumps([GOOD_STAMP, 5]).encode()),
        _b64(json.dumps([5, GOOD_ID]).encode()),
        _b64(json.dumps(["yesterday", GOOD_ID]).encode()),
        _b64(json.dumps([GOOD_STAMP, "not-an-id"]).encode()),
        # Spellings other than the server's own.
        _b64(json.dumps([GOOD_STAMP, GOOD_ID]).encode()),  # with spaces
        _b64(json.dumps([GOOD_STAMP, GOOD_ID], separators=(",", ":")).encode(), padded=True),
        _b64(json.dumps([GOOD_STAMP, GOOD_ID.upper()], separators=(",", ":")).encode()),
        _b64(json.dumps([GOOD_STAMP, str(uuid.UUID(GOOD_ID))], separators=(",", ":")).encode()),
        _b64(json.dumps([GOOD_STAMP + "+00:00", GOOD_ID], separators=(",", ":")).encode()),
        _b64(json.dumps(["2026-01-02T03:04:05", GOOD_ID], separators=(",", ":")).encode()),
        _b64(json.dumps(["2026-01-02 03:04:05.000006", GOOD_ID], separators=(",", ":")).encode()),
        _b64(b"\xff\xfe"),
    ],
)
def test_bad_cursors_are_refused(client: httpx.Client, project: Project, cursor: str) -> None:
    for params in ({"cursor": cursor}, {"cursor": cursor, "limit": "2"}):
        response = client.get(audit_path(project), headers=project.auth, params=params)
        assert_error(response, 400, "invalid_cursor")


def test_the_servers_own_spelling_is_the_one_accepted(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    good = _b64(json.dumps([GOOD_STAMP, GOOD_ID], separators=(",", ":")).encode())
    assert good == audit.encode_cursor(
        at=dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC), event_id=uuid.UUID(GOOD_ID)
    )
    # A position before every event of this project: nothing older.
    assert page(client, server, project, cursor=good) == ([], None)


def test_a_tampered_cursor_is_refused(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    rotate(server, project, 2)
    _, cursor = page(client, server, project, limit=1)
    assert cursor is not None
    for tampered in (cursor[:-1], cursor + "A", cursor[:5] + "+" + cursor[6:]):
        response = client.get(
            audit_path(project), headers=project.auth, params={"limit": 1, "cursor": tampered}
        )
        assert_error(response, 400, "invalid_cursor")


def test_a_cursor_is_only_a_position_in_the_callers_trail(
    client: httpx.Client, server: RunningServer, project: Project
) -> None:
    rotate(server, project, 2)
    _, cursor = page(client, server, project, limit=1)
    assert cursor is not None
    # Made after the cursor's event, so all of the other project's trail is newer.
    other = new_project(server.db, "other")

    assert page(client, server, other, limit=10, cursor=cursor) == ([], None)
    # And the token still decides which trail is read.
    response = client.get(audit_path(project), headers=other.auth, params={"cursor": cursor})
    assert_error(response, 404, "project_not_found")


def test_the_token_is_checked_before_the_cursor(client: httpx.Client, project: Project) -> None:
    response = client.get(audit_path(project), params={"cursor": "not base64!"})
    assert_error(response, 401, "missing_token")


def test_openapi_documents_the_cursor_and_the_headers(client: httpx.Client) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/projects/{project_id}/audit"][
        "get"
    ]
    parameters = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
    assert set(parameters) == {"limit", "cursor"}
    for parameter in parameters.values():
        assert parameter["required"] is False
        assert parameter["description"]
    assert set(operation["responses"]["200"]["headers"]) == {"X-Next-Cursor", "Link"}
