"""The change log that keeps every process's caches honest.

Each change that alters what a device's check may answer (activation, mandatory, delete, key
rotation, a new project's keys, token revocation) writes a row here in the same transaction as
the change itself. Every process polls for rows newer than the last it saw and drops what they
touch from its caches, so a change made through any process reaches all of them within the
poll interval.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from dataclasses import dataclass

import anyio.to_thread
from sqlalchemy import BigInteger, Integer, String, Uuid, bindparam, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from koolbase_ota.db import Base, Database, UTCDateTime, utcnow

logger = logging.getLogger(__name__)

#: How often each process prunes the log (`prune_forever`).
PRUNE_EVERY_SECONDS = 600

#: What changed: the bundles of a channel, or the keys (or tokens) of a project.
BUNDLES = "bundles"
KEYS = "keys"
TOKENS = "tokens"


class ChangeEvent(Base):
    __tablename__ = "change_events"

    # BigInteger on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    project_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    kind: Mapped[str] = mapped_column(String(20))
    channel: Mapped[str | None] = mapped_column(String(50))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


@dataclass(frozen=True)
class Change:
    id: int
    project_id: uuid.UUID
    kind: str
    channel: str | None


def record(
    session: Session, *, project_id: uuid.UUID, kind: str, channel: str | None = None
) -> None:
    """Note a change inside the caller's transaction."""
    session.add(ChangeEvent(project_id=project_id, kind=kind, channel=channel, created_at=utcnow()))


def latest_id(db: Database) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.coalesce(func.max(ChangeEvent.id), 0))) or 0)


#: How far back every poll looks again. Ids come from a sequence, and on PostgreSQL a
#: transaction can commit after one that took a later id; looking back this far catches such a
#: change as long as its transaction took less than this to commit (statements time out sooner).
LOOK_BACK = dt.timedelta(seconds=60)


#: The poll's queries, built once: every process runs them several times a second beside the
#: checks it serves, and building them (and an ORM session around them) each time was most of
#: a poll's cost, which holds the interpreter lock the checks need. New changes, a page at a
#: time from the oldest; and the look-back's, newest first (a late commit took a recent id).
#: Apart, so a look-back full of changes already applied never crowds out a new one: in one
#: query with one limit, more than `limit` changes in the last LOOK_BACK hid every newer one
#: from every process until they aged out of it.
_COLUMNS = (ChangeEvent.id, ChangeEvent.project_id, ChangeEvent.kind, ChangeEvent.channel)
_LIMIT = bindparam("limit", type_=Integer())
_NEW_CHANGES = (
    select(*_COLUMNS)
    .where(ChangeEvent.id > bindparam("last_id"))
    .order_by(ChangeEvent.id)
    .limit(_LIMIT)
)
_RECENT_CHANGES = (
    select(*_COLUMNS)
    .where(ChangeEvent.id <= bindparam("last_id"), ChangeEvent.created_at >= bindparam("since"))
    .order_by(ChangeEvent.id.desc())
    .limit(_LIMIT)
)


def changes_since(db: Database, last_id: int, *, limit: int = 10_000) -> list[Change]:
    """Every change after `last_id`, and up to `limit` of the last LOOK_BACK's (the newest),
    oldest first."""
    # A plain connection, not a session: a read, rolled back when the connection closes.
    with db.engine.connect() as connection:
        recent = {"last_id": last_id, "since": utcnow() - LOOK_BACK, "limit": limit}
        found = list(connection.execute(_RECENT_CHANGES, recent))
        found.reverse()
        after = last_id
        while True:
            page = list(connection.execute(_NEW_CHANGES, {"last_id": after, "limit": limit}))
            found += page
            if len(page) < limit:
                break
            after = page[-1].id
        return [
            Change(id=r.id, project_id=r.project_id, kind=r.kind, channel=r.channel) for r in found
        ]


def prune(db: Database, *, older_than: dt.timedelta = dt.timedelta(hours=1)) -> None:
    """Forget changes every process has long seen, but the newest: on SQLite the next id is
    one past the largest left, and an emptied table would hand out ids already seen."""
    newest = select(func.max(ChangeEvent.id)).scalar_subquery()
    with db.write() as session:
        session.execute(
            delete(ChangeEvent).where(
                ChangeEvent.created_at < utcnow() - older_than, ChangeEvent.id < newest
            )
        )


async def prune_forever(db: Database) -> None:
    """Prune every `PRUNE_EVERY_SECONDS`, in a thread the dashboard shares. Not in the poll's:
    a delete waits on a writer holding SQLite's lock, and the poll must not wait with it."""
    while True:
        await asyncio.sleep(PRUNE_EVERY_SECONDS)
        try:
            await anyio.to_thread.run_sync(prune, db)
        except Exception as exc:
            logger.warning("could not prune the change log: %s", type(exc).__name__)
