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

from sqlalchemy import Index, String, Text, Uuid, select, tuple_
from sqlalchemy.orm import Mapped, Session, mapped_column

from koolbase_ota import paging
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
    __table_args__ = (
        # The trail's order within a project: a page, the first or one deep in a long trail,
        # is a range scan of this index read backwards, never a sort of the project's events.
        Index("ix_audit_events_project_id_at_id", "project_id", "at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    project_id: Mapped[uuid.UUID] = mapped_column(Uuid)
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


@dataclass(frozen=True)
class EventPage:
    """One page of the trail, and the cursor of the next page when older events remain."""

    events: list[Event]
    next_cursor: str | None


def encode_cursor(*, at: dt.datetime, event_id: uuid.UUID) -> str:
    """The opaque position just after (older than) the event at `at` with id `event_id`."""
    stamp = at.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
    return paging.encode_cursor([stamp, event_id.hex])


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    """The (at, id) a cursor points after; anything not in our exact form is refused."""
    stamp, hex_id = paging.decode_cursor(cursor, 2)
    try:
        at = dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.UTC)
        event_id = uuid.UUID(hex=hex_id)
    except (ValueError, TypeError, AttributeError) as exc:
        raise paging.invalid_cursor() from exc
    # Only the spellings we hand out: a zone in the time (dropped above), fewer digits of a
    # second, or an id in capitals or with dashes is not ours.
    if encode_cursor(at=at, event_id=event_id) != cursor:
        raise paging.invalid_cursor()
    return at, event_id


def list_events(db: Database, *, project_id: uuid.UUID, limit: int = DEFAULT_LIMIT) -> list[Event]:
    """The project's latest `limit` events, newest first."""
    return list_event_page(db, project_id=project_id, limit=limit).events


def list_event_page(
    db: Database, *, project_id: uuid.UUID, limit: int = DEFAULT_LIMIT, cursor: str | None = None
) -> EventPage:
    """Up to `limit` events, newest first, starting after `cursor` when one is given.

    A keyset walk over (at, id): events recorded while a caller pages through the trail are
    newer than its cursor, so they neither shift nor repeat the pages that follow.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be 1 to {MAX_LIMIT}", code="invalid_limit")
    query = select(AuditEvent).where(AuditEvent.project_id == project_id)
    if cursor:
        at, event_id = decode_cursor(cursor)
        # A row value, not `at < :at OR (at = :at AND id < :id)`: both databases seek the
        # index straight to a row value, and read the whole project up to the cursor for the
        # OR (a deep page cost 20 times the first at 20,000 events).
        query = query.where(tuple_(AuditEvent.at, AuditEvent.id) < (at, event_id))
    # Several events of one request can share a timestamp on a coarse clock; the id only makes
    # the order stable, not meaningful.
    query = query.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit + 1)
    with db.read() as session:
        rows = list(session.scalars(query))
    events = [
        Event(
            id=row.id,
            project_id=row.project_id,
            at=row.at,
            actor=row.actor,
            action=row.action,
            target=row.target,
            details=json.loads(row.details),
        )
        for row in rows[:limit]
    ]
    if len(rows) <= limit:
        return EventPage(events=events, next_cursor=None)
    last = events[-1]
    return EventPage(events=events, next_cursor=encode_cursor(at=last.at, event_id=last.id))
