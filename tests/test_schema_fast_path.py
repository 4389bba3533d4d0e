"""`upgrade_schema`'s fast path (a read of `alembic_version`, without Alembic) behaves as the
Alembic path behind it: found by review of the change that added it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import Engine, event, text

from koolbase_ota.db import create_db_engine, upgrade_schema
from koolbase_ota.errors import DatabaseUnavailable
from tests.services import PostgresService
from tests.test_migrations_upgrade import engine, migrated

__all__ = ["engine", "migrated"]  # the fixtures, shared with the migration tests


def test_a_version_table_with_two_heads_is_not_taken_as_up_to_date(
    migrated: Engine, tmp_path: Path
) -> None:
    """The newest revision beside one this version does not know (a newer version that
    branched its history): Alembic refuses it ("more than one head present"); the fast path
    read the first row only and opened the database as up to date."""
    with migrated.begin() as connection:
        connection.execute(text("INSERT INTO alembic_version VALUES ('0099')"))
    with pytest.raises(Exception, match="more than one head"):
        upgrade_schema(migrated, lock_dir=tmp_path)


def test_a_version_table_that_times_out_is_read_once(
    postgres: PostgresService, tmp_path: Path
) -> None:
    """Another session holds the version table (a migration elsewhere): the read is cancelled
    by the statement timeout and reported as such. The fast path took the timeout for a missing
    table, and Alembic read again: the whole timeout waited twice."""
    engine = create_db_engine(postgres.create_database(), timeout_seconds=1)
    holder_engine = sqlalchemy.create_engine(engine.url)
    reads: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "alembic_version" in statement:
            reads.append(statement)

    try:
        upgrade_schema(engine, lock_dir=tmp_path)
        event.listen(engine, "before_cursor_execute", count)
        with holder_engine.connect() as holder:
            holder.execute(text("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE"))
            with pytest.raises(DatabaseUnavailable, match="statement timeout"):
                upgrade_schema(engine, lock_dir=tmp_path)
            holder.rollback()
        assert len(reads) == 1, reads
    finally:
        holder_engine.dispose()
        engine.dispose()
