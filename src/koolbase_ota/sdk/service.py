"""The answer to a device's update check, in plain functions with no web framework in them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select

from koolbase_ota.bundles.models import Bundle
from koolbase_ota.db import Database
from koolbase_ota.errors import InvalidInput
from koolbase_ota.projects.models import Channel

_MAX_VERSION_DIGITS = 18


@dataclass(frozen=True)
class Release:
    """What a device is offered: the active bundle and whether it must be applied."""

    version: int
    checksum: str
    storage_path: str
    file_size: int
    mandatory: bool
    release_notes: str | None


def parse_version(raw: str | None) -> int:
    """The device's current version: a non-negative integer, 0 when absent."""
    if raw is None:
        return 0
    if not raw.isascii() or not raw.isdigit() or len(raw) > _MAX_VERSION_DIGITS:
        raise InvalidInput("version must be a non-negative integer", code="invalid_version")
    return int(raw)


def find_update(
    db: Database, *, project_id: uuid.UUID, channel: str, current_version: int
) -> Release | None:
    """The active bundle of the channel if it is newer than the device's version, else None.

    `mandatory` is also true when any released (once active) bundle above the device's version
    is mandatory, so a device that skipped a mandatory release is still forced.
    """
    with db.read() as session:
        known = session.scalar(
            select(Channel.name).where(Channel.project_id == project_id, Channel.name == channel)
        )
        if known is None:
            raise InvalidInput(f"unknown channel {channel!r}", code="invalid_channel")
        active = session.scalar(
            select(Bundle).where(
                Bundle.project_id == project_id, Bundle.channel == channel, Bundle.active
            )
        )
        if active is None or active.version <= current_version:
            return None
        mandatory = active.mandatory or (
            session.scalar(
                select(Bundle.id)
                .where(
                    Bundle.project_id == project_id,
                    Bundle.channel == channel,
                    Bundle.mandatory,
                    Bundle.released_at.is_not(None),
                    Bundle.version > current_version,
                )
                .limit(1)
            )
            is not None
        )
    return Release(
        version=active.version,
        checksum=active.checksum,
        storage_path=active.storage_path,
        file_size=active.file_size,
        mandatory=mandatory,
        release_notes=active.release_notes,
    )


def bundle_for_download(db: Database, *, storage_path: str) -> Bundle | None:
    """The bundle stored at `storage_path`, or None once it is deleted."""
    with db.read() as session:
        return session.scalar(select(Bundle).where(Bundle.storage_path == storage_path))
