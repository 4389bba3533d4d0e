"""release safety: targeting, rollout, recall, promote

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 03:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import koolbase_ota.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("bundles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("platform", sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column("min_app_version", sa.String(length=31), nullable=True))
        batch_op.add_column(sa.Column("max_app_version", sa.String(length=31), nullable=True))
        batch_op.add_column(
            sa.Column(
                "rollout_percentage", sa.Integer(), server_default=sa.text("100"), nullable=False
            )
        )
        batch_op.add_column(sa.Column("recalled_at", koolbase_ota.db.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("promoted_from", sa.Uuid(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("bundles", schema=None) as batch_op:
        batch_op.drop_column("promoted_from")
        batch_op.drop_column("recalled_at")
        batch_op.drop_column("rollout_percentage")
        batch_op.drop_column("max_app_version")
        batch_op.drop_column("min_app_version")
        batch_op.drop_column("platform")
