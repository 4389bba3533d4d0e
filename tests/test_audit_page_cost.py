"""A page deep in a long audit trail costs what the first page costs: a range scan of the
(project_id, at, id) index read backwards. The first keyset query, `at < :at OR (at = :at AND
id < :id)`, was no range either database could seek to: SQLite sought on project_id alone and
skipped every newer event; PostgreSQL scanned ix_audit_events_at (every project's events) and
sorted. At 300,000 events the first page took 4 ms, one in the middle 58 ms (SQLite) and 40 ms
(PostgreSQL). Costs are counted (rows read, SQLite's steps), never timed."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import uuid
from typing import Any

from sqlalchemy import Engine, event, insert

from koolbase_ota import audit
from koolbase_ota.db import Database
from tests.test_migrations_upgrade import engine, migrated

__all__ = ["engine", "migrated"]  # the fixtures, shared with the migration tests

EVENTS = 20_000
LIMIT = 100
BASE = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _rows_read(engine: Engine, statement: str, parameters: Any) -> int:
    """What running `statement` costs the database: PostgreSQL's rows read by its scans
    (EXPLAIN ANALYZE), SQLite's virtual machine steps (a progress handler)."""
    raw = engine.raw_connection()
    try:
        if engine.dialect.name == "sqlite":
            connection = raw.driver_connection
            assert isinstance(connection, sqlite3.Connection)
            steps = 0

            def count() -> int:
                nonlocal steps
                steps += 1
                return 0

            connection.set_progress_handler(count, 1)
            try:
                connection.execute(statement, parameters).fetchall()
            finally:
                connection.set_progress_handler(None, 0)
            return steps
        cursor = raw.cursor()
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
        row = cursor.fetchone()
        assert row is not None
        plan = json.loads(row[0]) if isinstance(row[0], str) else row[0]
        return _scanned(plan[0]["Plan"])
    finally:
        raw.close()


def _scanned(node: dict[str, Any]) -> int:
    own = 0
    if "Scan" in node["Node Type"]:
        own = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
    return own + sum(_scanned(child) for child in node.get("Plans", []))


def _page_cost(engine: Engine, project_id: uuid.UUID, cursor: str | None) -> int:
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "audit_events" in statement:
            captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        page = audit.list_event_page(
            Database(engine), project_id=project_id, limit=LIMIT, cursor=cursor
        )
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(page.events) == LIMIT
    ((statement, parameters),) = captured
    return _rows_read(engine, statement, parameters)


def test_a_page_deep_in_a_long_trail_costs_what_the_first_page_costs(migrated: Engine) -> None:
    engine = migrated
    project_id = uuid.uuid4()
    ids = [uuid.uuid4() for _ in range(EVENTS)]
    with Database(engine).write() as session:
        session.execute(
            insert(audit.AuditEvent),
            [
                {
                    "id": ids[n],
                    "project_id": project_id,
                    "at": BASE + dt.timedelta(seconds=n),
                    "actor": "cli",
                    "action": "key.rotate",
                    "target": str(n),
                    "details": "{}",
                }
                for n in range(EVENTS)
            ],
        )
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.exec_driver_sql("ANALYZE audit_events")
    # A cursor in the middle of the trail: 10,000 events are newer, 9,999 older.
    middle = EVENTS // 2
    deep = audit.encode_cursor(at=BASE + dt.timedelta(seconds=middle), event_id=ids[middle])

    first_cost = _page_cost(engine, project_id, None)
    deep_cost = _page_cost(engine, project_id, deep)

    assert deep_cost <= 3 * first_cost, (engine.dialect.name, first_cost, deep_cost)
