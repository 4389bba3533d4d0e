"""A change committed, then the database failing before this process's checks are told of it:
the change is saved, so the request answers as a success, and the checks learn of it with the
next poll. A 503 there had clients repeat the request: a second promoted copy, a toggle undone,
a 409 for the channel they had just added.

The failure is caused for real on PostgreSQL: right after the request's commit (a session hook
arms it), another connection locks the change log, and the refresh that reads it runs into the
statement timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, event, text
from sqlalchemy.orm import Session

from koolbase_ota.changes import ChangeEvent
from tests.conftest import Project, RunningServer, eventually, new_project, released, uploaded

CHECK = "/v1/sdk/ota/check"


@dataclass
class ChangeLogLock:
    """Locks the change log right after the next commit of `server`, once armed."""

    server: RunningServer
    armed: threading.Event = field(default_factory=threading.Event)
    connection: Connection | None = None

    def before_flush(self, session: Session, *_args: object) -> None:
        if any(isinstance(added, ChangeEvent) for added in session.new):
            session.info["logs_a_change"] = True

    def after_commit(self, session: Session) -> None:
        bind = session.get_bind()
        # The app's own engine (the write sessions' carries options of its own: compare pools),
        # and the transaction that logged the change (a promote commits its version first).
        if (
            not self.armed.is_set()
            or bind.engine.pool is not self.server.context.db.engine.pool
            or not session.info.pop("logs_a_change", False)
        ):
            return
        self.armed.clear()
        self.connection = bind.engine.connect()
        self.connection.execute(text("SET statement_timeout = 0"))
        self.connection.execute(text("LOCK TABLE change_events IN ACCESS EXCLUSIVE MODE"))

    def release(self) -> None:
        if self.connection is not None:
            self.connection.close()  # rolls its transaction back: the lock goes
            self.connection = None


@pytest.fixture
def lock(server_factory: Callable[..., RunningServer]) -> Iterator[ChangeLogLock]:
    server = server_factory(database_timeout_seconds=1)
    if server.db.engine.dialect.name != "postgresql":
        pytest.skip("on SQLite (WAL) a reader is never blocked, so the refresh cannot fail so")
    lock = ChangeLogLock(server)
    event.listen(Session, "before_flush", lock.before_flush)
    event.listen(Session, "after_commit", lock.after_commit)
    try:
        yield lock
    finally:
        event.remove(Session, "after_commit", lock.after_commit)
        event.remove(Session, "before_flush", lock.before_flush)
        lock.release()


def _check(client: httpx.Client, project: Project) -> dict[str, Any]:
    body: dict[str, Any] = client.get(CHECK, headers=project.key()).json()
    return body


@pytest.mark.parametrize("change", ["activate", "toggle", "recall", "promote", "channel", "delete"])
def test_a_change_committed_before_the_database_fails_answers_as_saved(
    lock: ChangeLogLock, change: str
) -> None:
    server = lock.server
    project = new_project(server.db)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        first = released(client, project)
        second = uploaded(client, project)
        assert _check(client, project)["version"] == 1  # cached before the change
        one, two = (project.path(f"/bundles/{bundle['id']}") for bundle in (first, second))
        requests: dict[str, Callable[[], httpx.Response]] = {
            "activate": lambda: client.post(two + "/activate", headers=project.auth),
            "toggle": lambda: client.patch(one, headers=project.auth),
            "recall": lambda: client.post(one + "/recall", headers=project.auth),
            "promote": lambda: client.post(
                one + "/promote", headers=project.auth, json={"channel": "staging"}
            ),
            "channel": lambda: client.post(
                project.path("/channels"), headers=project.auth, json={"name": "beta"}
            ),
            "delete": lambda: client.delete(two, headers=project.auth),
        }
        lock.armed.set()
        response = requests[change]()
        assert lock.connection is not None, "the request committed nothing"
        assert response.status_code in (200, 201, 204), response.text
        lock.release()

        bundles = client.get(project.path("/bundles"), headers=project.auth).json()
        channels = client.get(project.path("/channels"), headers=project.auth).json()
        saved = {
            "activate": [b["version"] for b in bundles if b["active"]] == [2],
            "toggle": [b["mandatory"] for b in bundles if b["version"] == 1] == [True],
            "recall": [b["recalled_at"] is not None for b in bundles if b["version"] == 1]
            == [True],
            "promote": [b["channel"] for b in bundles].count("staging") == 1,
            "channel": "beta" in [c["name"] for c in channels],
            "delete": [b["version"] for b in bundles] == [1],
        }
        assert saved[change], bundles
        # The check learns of it with the next poll of the change log.
        seen: dict[str, Callable[[dict[str, Any]], bool]] = {
            "activate": lambda body: body.get("version") == 2,
            "toggle": lambda body: body.get("mandatory") is True,
            "recall": lambda body: body == {"has_update": False},
        }
        if change in seen:
            eventually(lambda: seen[change](_check(client, project)), f"the {change} seen")
