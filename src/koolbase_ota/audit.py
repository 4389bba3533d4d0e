"""The audit trail: who changed what in a project, and when.

Each dashboard change writes one row here in the same transaction as the change itself, so a
change that is refused or rolled back leaves no trace and a committed one always does. Details
hold ids, channels and environment names only, never a token or a key.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, Text, Uuid, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from koolbase_ota.db import Base, Database, UTCDateTime, utcnow
from koolbase_ota.errors import InvalidInput

#: The actor of a change made with the command line (it holds the database, not a token).
CLI = "cli"

BUNDLE_UPLOAD = "bundle.upload"
BUNDLE_ACTIVATE = "bundle.activate"
BUNDLE_MANDATORY = "bundle.mandatory"
BUNDLE_DELETE = "bundle.delete"
BUNDLE_UPDATE = "bundle.update"
BUNDLE_RECALL = "bundle.recall"
TOKEN_CREATE = "token.create"  # noqa: S105  (an action name, not a secret)
TOKEN_REVOKE = "token.revoke"  # noqa: S105  (an action name, not a secret)
KEY_ROTATE = "key.rotate"
PROJECT_CREATE = "project.create"
CHANNEL_ADD = "channel.add"
BUNDLE_PROMOTE = "bundle.promote"

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def token_actor(token_id: uuid.UUID) -> str:
    """The actor of a change made through the API with this dashboard token."""
    return f"token:{token_id}"


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    project_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(50))
    target: Mapped[str] = mapped_column(String(200))
    details: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class Event:
    id: uuid.UUID
    project_id: uuid.UUID
    at: dt.datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]


def record(
    session: Session,
    *,
    project_id: uuid.UUID,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Note a change inside the caller's transaction."""
    session.add(
        AuditEvent(
            id=uuid.uuid4(),
            project_id=project_id,
            at=utcnow(),
            actor=actor,
            action=action,
            target=target,
            details=json.dumps(details or {}, sort_keys=True),
        )
    )


def list_events(db: Database, *, project_id: uuid.UUID, limit: int = DEFAULT_LIMIT) -> list[Event]:
    """The project's latest `limit` events, newest first."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be 1 to {MAX_LIMIT}", code="invalid_limit")
    with db.read() as session:
        rows = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.project_id == project_id)
            # Several events of one request can share a timestamp on a coarse clock; the id
            # only makes the order stable, not meaningful.
            .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
            .limit(limit)
        )
        return [
            Event(
                id=row.id,
                project_id=row.project_id,
                at=row.at,
                actor=row.actor,
                action=row.action,
                target=row.target,
                details=json.loads(row.details),
            )
            for row in rows
        ]
