"""A project's channels: the three seed channels every project has, and those it adds.

Channels are never removed: a channel's row holds its version counter, and a channel made again
under the same name would give out versions that devices already have.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from koolbase_ota import audit, changes
from koolbase_ota.config import CHANNELS
from koolbase_ota.db import Database, utcnow
from koolbase_ota.errors import Conflict, InvalidInput, NotFound
from koolbase_ota.projects.models import Channel, Project

#: Lowercase letters, digits, `.`, `_` and `-`, starting with a letter or digit: safe in a URL
#: query, a storage path (`ota/<project>/<channel>/v<N>.zip`) and a file name, with no `..`
#: segment possible, and no two names that differ only by case.
NAME_RULE = re.compile(r"[a-z0-9][a-z0-9._-]{0,49}")
#: A project's channels, the seed ones included: enough for any release process, and a bound
#: on what one dashboard token can make the server hold.
MAX_CHANNELS = 100


@dataclass(frozen=True)
class ChannelInfo:
    name: str
    created_at: dt.datetime
    #: One of the seed channels every project has.
    builtin: bool


def _info(row: Channel, project_created_at: dt.datetime) -> ChannelInfo:
    return ChannelInfo(
        name=row.name,
        # Only a row written before migration 0005 filled the column could lack it.
        created_at=row.created_at or project_created_at,
        builtin=row.name in CHANNELS,
    )


def _order(info: ChannelInfo) -> tuple[int, str]:
    # Seed channels first in their usual order, then the project's own by name; sorted here, not
    # by the database, so the order does not depend on its collation.
    if info.builtin:
        return CHANNELS.index(info.name), ""
    return len(CHANNELS), info.name


def check_name(name: str) -> str:
    """The name if it follows NAME_RULE, else InvalidInput `invalid_channel`."""
    if not NAME_RULE.fullmatch(name):
        raise InvalidInput(
            "a channel name is 1 to 50 characters of a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit",
            code="invalid_channel",
        )
    return name


def list_channels(db: Database, *, project_id: uuid.UUID) -> list[ChannelInfo]:
    """Every channel of the project: the seed channels first, then its own by name."""
    with db.read() as session:
        project = session.get(Project, project_id)
        if project is None:
            raise NotFound("project not found", code="project_not_found")
        rows = session.scalars(select(Channel).where(Channel.project_id == project_id))
        return sorted((_info(row, project.created_at) for row in rows), key=_order)


def add_channel(
    db: Database, *, project_id: uuid.UUID, name: str, actor: str = audit.CLI
) -> ChannelInfo:
    """Add a channel to the project; its versions start at 1."""
    check_name(name)
    try:
        with db.write() as session:
            # Locking the project row queues concurrent adds, so the count below stays true.
            project = session.scalar(
                select(Project).where(Project.id == project_id).with_for_update()
            )
            if project is None:
                raise NotFound("project not found", code="project_not_found")
            if session.get(Channel, (project_id, name)) is not None:
                raise Conflict(f"the project already has a channel {name!r}", code="channel_exists")
            count = session.scalar(
                select(func.count()).select_from(Channel).where(Channel.project_id == project_id)
            )
            if (count or 0) >= MAX_CHANNELS:
                raise Conflict(
                    f"a project has at most {MAX_CHANNELS} channels", code="too_many_channels"
                )
            row = Channel(project_id=project_id, name=name, last_version=0, created_at=utcnow())
            session.add(row)
            # Checks may have cached "no such channel" for this name; they must look again.
            changes.record(session, project_id=project_id, kind=changes.BUNDLES, channel=name)
            audit.record(
                session,
                project_id=project_id,
                actor=actor,
                action=audit.CHANNEL_ADD,
                target=name,
                details={"channel": name},
            )
            info = _info(row, project.created_at)
    except IntegrityError as exc:
        # Another request added the same name between our look and our insert.
        raise Conflict(
            f"the project already has a channel {name!r}", code="channel_exists"
        ) from exc
    return info
