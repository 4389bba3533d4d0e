"""Alembic environment: runs on the connection `koolbase_ota.db.upgrade_schema` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import koolbase_ota.audit
import koolbase_ota.bundles.models
import koolbase_ota.changes
import koolbase_ota.projects.models  # noqa: F401  (registers the tables on the metadata)
from koolbase_ota.db import Base, normalise_url

target_metadata = Base.metadata
config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    # Plain `alembic` from the command line (used to write new migrations).
    url = config.get_main_option("sqlalchemy.url") or "sqlite:///./data/koolbase-ota.db"
    engine = create_engine(normalise_url(url))
    with engine.begin() as conn:
        _migrate(conn)


def _migrate(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite can only alter tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
