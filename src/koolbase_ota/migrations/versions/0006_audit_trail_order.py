"""audit events: one index in the trail's order (project, at, id) for its pages

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 10:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The new index starts with project_id, so the old one on project_id alone is redundant.
    op.create_index("ix_audit_events_project_id_at_id", "audit_events", ["project_id", "at", "id"])
    op.drop_index("ix_audit_events_project_id", table_name="audit_events")


def downgrade() -> None:
    op.create_index("ix_audit_events_project_id", "audit_events", ["project_id"])
    op.drop_index("ix_audit_events_project_id_at_id", table_name="audit_events")
