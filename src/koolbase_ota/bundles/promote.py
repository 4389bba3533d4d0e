"""Promote: copy a released or tested bundle into a channel as a new version, without re-upload.

The copy is a new bundle (the target channel's next never-reused version) with the same bytes,
checksum and size, and the source's targeting; the file is copied inside the store. Promoting a
bundle into its own channel and activating it is how every device, seed SDKs included, is rolled
back: the old content arrives as a version higher than the bad one.

A recalled bundle is not promoted: it was pulled because it is bad, and a copy would serve the
same bytes again under a new version with nothing left to say they were recalled.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from koolbase_ota import audit, changes
from koolbase_ota.bundles import service, targeting
from koolbase_ota.bundles.models import Bundle, PendingObject
from koolbase_ota.db import Database, database_now, utcnow
from koolbase_ota.errors import Conflict, InvalidInput, NotFound
from koolbase_ota.storage import BundleStore, ObjectNotFound, StoreOutcomeUnknown

logger = logging.getLogger(__name__)

#: The fields of a promote request body.
FIELDS = ("channel", "activate", "rollout_percentage", "release_notes", "mandatory")


class _Keep:
    """The source's release notes, for a request that does not give any."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()


@dataclass(frozen=True)
class Promotion:
    """What to make of the copy: where, whether to activate it and at what rollout."""

    channel: str
    activate: bool = False
    #: The copy's rollout; None: 100 (a promoted bundle does not inherit the source's ramp).
    rollout_percentage: int | None = None
    release_notes: str | _Keep | None = KEEP
    mandatory: bool = False


def parse_promotion(data: dict[str, Any]) -> Promotion:
    """A promote body (a JSON object of FIELDS) checked field by field, each with its own code."""
    channel = data.get("channel")
    if not isinstance(channel, str) or not channel:
        raise InvalidInput("channel is required: the channel to copy into", code="invalid_channel")
    activate = data.get("activate", False)
    if not isinstance(activate, bool):
        raise InvalidInput("activate must be true or false", code="invalid_activate")
    mandatory = data.get("mandatory", False)
    if not isinstance(mandatory, bool):
        raise InvalidInput("mandatory must be true or false", code="invalid_mandatory")
    rollout = data.get("rollout_percentage")
    if rollout is not None and type(rollout) is not int:
        raise InvalidInput(
            "rollout_percentage must be a whole number from 1 to 100",
            code="invalid_rollout_percentage",
        )
    notes = data.get("release_notes", KEEP)
    if notes is not KEEP and notes is not None and not isinstance(notes, str):
        raise InvalidInput("release_notes must be a string or null", code="invalid_release_notes")
    return checked(
        Promotion(
            channel=channel,
            activate=activate,
            rollout_percentage=rollout,
            release_notes=notes,
            mandatory=mandatory,
        )
    )


def checked(promotion: Promotion) -> Promotion:
    """The promotion with its values checked (what the CLI builds goes through here too)."""
    rollout = promotion.rollout_percentage
    if rollout is not None:
        rollout = targeting.parse_rollout_percentage(rollout)
    notes = promotion.release_notes
    if isinstance(notes, str):
        notes = service.check_release_notes(notes or None)  # as at upload: empty is none
    return Promotion(
        channel=promotion.channel,
        activate=promotion.activate,
        rollout_percentage=rollout,
        release_notes=notes,
        mandatory=promotion.mandatory,
    )


@dataclass(frozen=True)
class _Source:
    id: uuid.UUID
    project_id: uuid.UUID
    channel: str
    version: int
    storage_path: str
    checksum: str
    file_size: int
    release_notes: str | None
    platform: str | None
    min_app_version: str | None
    max_app_version: str | None


def _promotable(db: Database, *, project_id: uuid.UUID, bundle_id: uuid.UUID) -> _Source:
    with db.read() as session:
        bundle = session.scalar(
            select(Bundle).where(Bundle.id == bundle_id, Bundle.project_id == project_id)
        )
    if bundle is None:
        raise NotFound("bundle not found", code="bundle_not_found")
    if bundle.recalled_at is not None:
        raise _recalled()
    return _Source(
        id=bundle.id,
        project_id=bundle.project_id,
        channel=bundle.channel,
        version=bundle.version,
        storage_path=bundle.storage_path,
        checksum=bundle.checksum,
        file_size=bundle.file_size,
        release_notes=bundle.release_notes,
        platform=bundle.platform,
        min_app_version=bundle.min_app_version,
        max_app_version=bundle.max_app_version,
    )


def _copy_of(
    session: Session,
    source: _Source,
    promotion: Promotion,
    *,
    channel: str,
    version: int,
    path: str,
) -> Bundle:
    """The copy's row, from the source as it is now (its channel locked by the caller): a
    recall since it was first read refuses the promote, and targeting or release notes changed
    since are the copy's. A source deleted since is copied as it was read: its file is copied
    already."""
    current = session.scalar(select(Bundle).where(Bundle.id == source.id))
    if current is not None and current.recalled_at is not None:
        raise _recalled()
    targeted: Bundle | _Source = current if current is not None else source
    now = utcnow()
    return Bundle(
        id=uuid.uuid4(),
        project_id=source.project_id,
        channel=channel,
        version=version,
        checksum=source.checksum,
        storage_path=path,
        file_size=source.file_size,
        mandatory=promotion.mandatory,
        active=False,
        release_notes=(
            targeted.release_notes
            if isinstance(promotion.release_notes, _Keep)
            else promotion.release_notes
        ),
        created_at=now,
        updated_at=now,
        platform=targeted.platform,
        min_app_version=targeted.min_app_version,
        max_app_version=targeted.max_app_version,
        rollout_percentage=promotion.rollout_percentage or 100,
        promoted_from=source.id,
    )


def _recalled() -> Conflict:
    return Conflict(
        "the bundle is recalled: it is never served again, so it is not promoted either",
        code="bundle_recalled",
    )


async def promote_bundle(
    *,
    db: Database,
    store: BundleStore,
    project_id: uuid.UUID,
    bundle_id: uuid.UUID,
    promotion: Promotion,
    actor: str = audit.CLI,
) -> Bundle:
    """Copy the bundle into `promotion.channel` as its next version; store it, or leave nothing."""
    promotion = checked(promotion)
    source = await service._db(lambda: _promotable(db, project_id=project_id, bundle_id=bundle_id))
    channel = promotion.channel
    await service._db(lambda: service.check_channel(db, project_id=project_id, channel=channel))

    # 1. Allocate the version and record the object about to be written, as an upload does:
    #    a crash after this leaves a record for `gc`, never an unrecorded file.
    def allocate() -> tuple[str, int]:
        with db.write() as session:
            row = service.lock_channel(session, project_id=project_id, name=channel)
            row.last_version += 1
            path = service.storage_path(
                project_id=project_id, channel=channel, version=row.last_version
            )
            session.add(
                PendingObject(storage_path=path, reason="upload", created_at=database_now(session))
            )
            return path, row.last_version

    path, version = await service._db(allocate)

    # 2. Copy inside the store. If that fails nothing references the target; drop the record,
    #    unless the store may still finish the copy: then `gc` removes whatever lands.
    try:
        await store.copy(source.storage_path, path)
    except StoreOutcomeUnknown:
        logger.warning("copying to %s failed midway; left recorded for gc", path)
        raise
    except BaseException as exc:
        await service._forget_pending(db, path)
        if isinstance(exc, ObjectNotFound):
            # The source was deleted since we read it (or its file is gone): nothing to copy.
            raise NotFound("bundle not found", code="bundle_not_found") from exc
        raise

    # 3. Insert the row, clear the record and (if asked) activate, all in one transaction.
    committing = False

    def record() -> Bundle:
        nonlocal committing
        with db.write() as session:
            # The source's channel too (both in name order, so that two promotes the other way
            # round cannot deadlock): a recall or PATCH of the source queues on it, and one
            # that committed since the source was first read must be seen, or the copy would
            # serve a recalled bundle's bytes again.
            for name in sorted({channel, source.channel}):
                service.lock_channel(session, project_id=project_id, name=name)
            bundle = _copy_of(
                session, source, promotion, channel=channel, version=version, path=path
            )
            session.add(bundle)
            session.execute(delete(PendingObject).where(PendingObject.storage_path == path))
            changes.record(session, project_id=project_id, kind=changes.BUNDLES, channel=channel)
            audit.record(
                session,
                project_id=project_id,
                actor=actor,
                action=audit.BUNDLE_PROMOTE,
                target=str(bundle.id),
                details={
                    "channel": channel,
                    "version": version,
                    "from": str(source.id),
                    "from_channel": source.channel,
                    "from_version": source.version,
                    "checksum": source.checksum,
                    "mandatory": promotion.mandatory,
                    "activate": promotion.activate,
                },
            )
            if promotion.activate:
                session.flush()
                service.activate_in_session(
                    session,
                    bundle,
                    rollout_percentage=promotion.rollout_percentage,
                    actor=actor,
                )
            session.flush()
            committing = True
        return bundle

    try:
        return await service._db(record)
    except BaseException as exc:
        found = await service.settle_failed_record(
            db=db, store=store, path=path, committing=committing, what="promote"
        )
        if found is None or not isinstance(exc, Exception):
            raise
        return found
