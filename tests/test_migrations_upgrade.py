"""An install of every older schema revision, with data in it, upgraded to the newest: no row
lost, the schema exactly what the models say, and the one-active rule still partial."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, func, select, table, text

import koolbase_ota.audit
import koolbase_ota.bundles.models
import koolbase_ota.changes
import koolbase_ota.projects.models  # noqa: F401  (registers every table on the metadata)
from koolbase_ota.db import SCHEMA_HEAD, Base, alembic_config, create_db_engine, upgrade_schema
from tests.services import PostgresService

AT = dt.datetime(2025, 3, 1, 12, 0, 0)  # naive UTC, as UTCDateTime stores it
OLD_REVISIONS = ["0001", "0002", "0003", "0004", "0005"]
TABLES = ["projects", "channels", "environments", "dashboard_tokens", "bundles", "pending_objects"]


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = create_db_engine(f"sqlite:///{tmp_path / 'old.db'}")
    else:
        postgres: PostgresService = request.getfixturevalue("postgres")
        engine = create_db_engine(postgres.create_database())
    yield engine
    engine.dispose()


@pytest.fixture
def migrated(engine: Engine, tmp_path: Path) -> Engine:
    """An empty database of each kind (`engine`), at the newest schema."""
    assert upgrade_schema(engine, lock_dir=tmp_path) is not None
    return engine


def _fill(connection: Connection, revision: str) -> dict[str, Any]:
    """Rows that every table of `revision` can hold; returns the ids used."""

    def ident(value: uuid.UUID) -> object:
        # How SQLAlchemy's Uuid type stores an id: 32 hex digits on SQLite, native elsewhere.
        return value.hex if connection.dialect.name == "sqlite" else value

    ids = {"project": uuid.uuid4(), "bundle": uuid.uuid4(), "other": uuid.uuid4()}
    p = ident(ids["project"])
    statements = [
        ("INSERT INTO projects VALUES (:p, 'old', :at)", {}),
        ("INSERT INTO channels (project_id, name, last_version) VALUES (:p, 'production', 2)", {}),
        ("INSERT INTO channels (project_id, name, last_version) VALUES (:p, 'beta-ios', 0)", {}),
        (
            "INSERT INTO environments VALUES (:e, :p, 'production', :h1, 'pk_live_1a2b', :at)",
            {"e": ident(uuid.uuid4()), "h1": "1" * 64},
        ),
        (
            "INSERT INTO dashboard_tokens VALUES (:t, :p, :h2, 'kbota_1a2b', :at, NULL, :at)",
            {"t": ident(uuid.uuid4()), "h2": "2" * 64},
        ),
        ("INSERT INTO pending_objects VALUES ('ota/x/production/v3.zip', 'delete', :at)", {}),
    ]
    for bundle, version, active in ((ids["bundle"], 1, True), (ids["other"], 2, False)):
        statements.append(
            (
                "INSERT INTO bundles (id, project_id, channel, version, checksum, storage_path,"
                " file_size, mandatory, active, release_notes, created_at, updated_at,"
                " released_at) VALUES (:b, :p, 'production', :v, :sum, :path, 3, true, :active,"
                " 'notes', :at, :at, :released)",
                {
                    "b": ident(bundle),
                    "v": version,
                    "sum": "sha256:" + "0" * 64,
                    "path": f"ota/x/production/v{version}.zip",
                    "active": active,
                    "released": AT if active else None,
                },
            )
        )
    if revision >= "0002":
        statements.append(
            (
                "INSERT INTO change_events (project_id, kind, created_at) VALUES (:p, 'keys', :at)",
                {},
            )
        )
    if revision >= "0003":
        statements.append(
            (
                "INSERT INTO audit_events VALUES"
                " (:a, :p, :at, 'cli', 'project.create', 'old', '{}')",
                {"a": ident(uuid.uuid4())},
            )
        )
    if revision >= "0005":
        # From 0005 on, a channel is written with its creation time (before, the upgrade
        # fills it in).
        statements.append(("UPDATE channels SET created_at = :at", {}))
    for sql, params in statements:
        connection.execute(text(sql), {"p": p, "at": AT, **params})
    return {**ids, "ident": ident}


def _counts(connection: Connection) -> dict[str, int | None]:
    return {
        name: connection.scalar(select(func.count()).select_from(table(name))) for name in TABLES
    }


@pytest.mark.parametrize("revision", OLD_REVISIONS)
def test_an_old_install_with_data_upgrades_to_the_newest_schema(
    engine: Engine, tmp_path: Path, revision: str
) -> None:
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)
        filled = _fill(connection, revision)
    with engine.connect() as connection:
        before = _counts(connection)

    assert upgrade_schema(engine, lock_dir=tmp_path) is not None

    with engine.connect() as connection:
        assert _counts(connection) == before
        bundle = connection.execute(
            text(
                "SELECT active, mandatory, release_notes, rollout_percentage, recalled_at,"
                " platform FROM bundles WHERE id = :b"
            ),
            {"b": filled["ident"](filled["bundle"])},
        ).one()
        assert tuple(bundle) == (True, True, "notes", 100, None, None)
        missing = connection.execute(
            text("SELECT count(*) FROM channels WHERE created_at IS NULL")
        ).scalar()
        assert missing == 0
        differences = compare_metadata(
            MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata
        )
        assert differences == []

    # The one-active rule is still partial: a second inactive bundle is fine, a second active
    # one is refused by the database itself.
    insert = text(
        "INSERT INTO bundles (id, project_id, channel, version, checksum, storage_path, file_size,"
        " mandatory, active, created_at, updated_at, rollout_percentage) VALUES (:b, :p,"
        " 'production', :v, :sum, :path, 3, false, :active, :at, :at, 100)"
    )
    ident = filled["ident"]

    def row(version: int, active: bool) -> dict[str, Any]:
        return {
            "b": ident(uuid.uuid4()),
            "p": ident(filled["project"]),
            "v": version,
            "sum": "sha256:" + "0" * 64,
            "path": f"ota/x/production/v{version}.zip",
            "active": active,
            "at": AT,
        }

    with engine.begin() as connection:
        connection.execute(insert, row(3, False))
    with pytest.raises(sqlalchemy.exc.IntegrityError), engine.begin() as connection:
        connection.execute(insert, row(4, True))


def test_the_schema_head_named_in_code_is_the_newest_migration() -> None:
    """`upgrade_schema` takes a database at `SCHEMA_HEAD` as up to date without asking Alembic:
    a migration added without moving it would never run."""
    from alembic.script import ScriptDirectory

    from koolbase_ota.db import SCHEMA_HEAD

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == SCHEMA_HEAD


def test_a_database_already_up_to_date_is_opened_without_alembic(
    migrated: Engine, tmp_path: Path
) -> None:
    """Every command and every server start checks the schema; at the newest one that costs a
    query, not Alembic's import and a parse of every migration (a fifth of a command's time)."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from koolbase_ota.db import create_db_engine, upgrade_schema\n"
        "engine = create_db_engine(sys.argv[1])\n"
        "assert upgrade_schema(engine, lock_dir=Path(sys.argv[2])) is None\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'alembic'))\n"
    )
    url = migrated.url.render_as_string(hide_password=False)
    result = subprocess.run(
        [sys.executable, "-c", script, url, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_of_processes_migrating_at_once_only_the_one_that_did_says_so(
    engine: Engine, tmp_path: Path
) -> None:
    """Servers started together on a new database all logged "migrated the database to
    revision ...", though only the first to hold the migration lock migrated it."""
    from concurrent.futures import ThreadPoolExecutor

    from koolbase_ota.db import migration_lock

    with ThreadPoolExecutor(3) as pool:
        with migration_lock(engine, tmp_path):
            # Each finds the schema behind, then waits for the lock held here.
            starts = [pool.submit(upgrade_schema, engine, lock_dir=tmp_path) for _ in range(3)]
            time.sleep(1)
        revisions = [start.result(timeout=60) for start in starts]
    assert sorted(revisions, key=str) == [SCHEMA_HEAD, None, None]
