"""channels: created_at, for channels a project adds

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 04:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import koolbase_ota.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN, not a batch rebuild: on SQLite, rebuilding `channels` would drop the
    # table that `bundles` references, and its ON DELETE CASCADE would empty `bundles`.
    op.add_column("channels", sa.Column("created_at", koolbase_ota.db.UTCDateTime(), nullable=True))
    # The seed channels were made with their project.
    op.execute(
        "UPDATE channels SET created_at = "
        "(SELECT projects.created_at FROM projects WHERE projects.id = channels.project_id)"
    )


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+) for the same reason as above.
    op.drop_column("channels", "created_at")
