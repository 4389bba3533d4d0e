"""Migration 0005 on a database that already holds projects, channels and bundles: the seed
channels get their project's creation time, and no bundle is lost on the way."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, text

from koolbase_ota.db import alembic_config, create_db_engine, upgrade_schema
from tests.services import PostgresService


def _upgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "sqlite":
        return create_db_engine(f"sqlite:///{tmp_path / 'old.db'}")
    postgres: PostgresService = request.getfixturevalue("postgres")
    return create_db_engine(postgres.create_database())


def test_existing_channels_get_their_projects_time_and_bundles_stay(
    engine: Engine, tmp_path: Path
) -> None:
    _upgrade(engine, "0004")

    def ident(value: uuid.UUID) -> object:
        # How SQLAlchemy's Uuid type stores an id: 32 hex digits on SQLite, native on PostgreSQL.
        return value.hex if engine.dialect.name == "sqlite" else value

    project_id = uuid.uuid4()
    created = dt.datetime(2025, 3, 1, 12, 0, 0)  # stored as naive UTC, as UTCDateTime does
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO projects (id, name, created_at) VALUES (:id, 'old', :at)"),
            {
                "id": project_id.hex if engine.dialect.name == "sqlite" else project_id,
                "at": created,
            },
        )
        pid = ident(project_id)
        for name in ("production", "staging", "development"):
            connection.execute(
                text("INSERT INTO channels (project_id, name, last_version) VALUES (:p, :n, 1)"),
                {"p": pid, "n": name},
            )
        connection.execute(
            text(
                "INSERT INTO bundles (id, project_id, channel, version, checksum, storage_path,"
                " file_size, mandatory, active, created_at, updated_at, rollout_percentage)"
                " VALUES (:id, :p, 'production', 1, :sum, 'ota/x/production/v1.zip', 3, false,"
                " true, :at, :at, 100)"
            ),
            {
                "id": ident(uuid.uuid4()),
                "p": pid,
                "sum": "sha256:" + "0" * 64,
                "at": created,
            },
        )

    assert upgrade_schema(engine, lock_dir=tmp_path) is not None

    with engine.connect() as connection:
        rows = connection.execute(text("SELECT name, created_at FROM channels")).all()
        bundles = connection.execute(text("SELECT count(*) FROM bundles")).scalar()
    assert sorted(name for name, _ in rows) == ["development", "production", "staging"]
    for _name, at in rows:
        stamp = at if isinstance(at, dt.datetime) else dt.datetime.fromisoformat(str(at))
        assert stamp.replace(tzinfo=None) == created
    assert bundles == 1
    engine.dispose()
