"""Upload, list, activate, set mandatory and delete bundles."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread
from sqlalchemy import delete, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from sqlalchemy.orm import Session

from koolbase_ota.bundles.models import Bundle, PendingObject
from koolbase_ota.bundles.multipart import StagedUpload
from koolbase_ota.bundles.validation import ZipLimits, validate_zip
from koolbase_ota.db import Database, utcnow
from koolbase_ota.errors import DatabaseUnavailable, InvalidInput, NotFound, OTAError
from koolbase_ota.projects.models import Channel
from koolbase_ota.storage import BundleStore

logger = logging.getLogger(__name__)

MAX_RELEASE_NOTES = 10_000
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
T = TypeVar("T")


def storage_path(*, project_id: uuid.UUID, channel: str, version: int) -> str:
    return f"ota/{project_id}/{channel}/v{version}.zip"


def parse_bool(value: str, *, field: str) -> bool:
    """`true/false`, `1/0`, `yes/no`, any case; anything else is refused."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidInput(f"{field} must be true or false", code=f"invalid_{field}")


def _later(previous: dt.datetime) -> dt.datetime:
    """Now, but strictly after `previous`, so every change shows a fresh `updated_at`."""
    return max(utcnow(), previous + dt.timedelta(microseconds=1))


async def _db(call: Callable[[], T]) -> T:
    """Run a blocking database step off the event loop; a failing database is a 503."""
    try:
        return await anyio.to_thread.run_sync(call)
    except OTAError:
        raise
    except (OperationalError, InterfaceError, SQLAlchemyTimeout) as exc:
        logger.warning("database error: %s", type(exc).__name__)
        raise DatabaseUnavailable("the database is unavailable; try again") from exc


def _channel_for_update(session: Session, *, project_id: uuid.UUID, name: str) -> Channel:
    """Lock the channel row; every change to a channel's bundles queues on it."""
    channel = session.scalar(
        select(Channel)
        .where(Channel.project_id == project_id, Channel.name == name)
        .with_for_update()
    )
    if channel is None:
        raise InvalidInput(f"unknown channel {name!r}", code="invalid_channel")
    return channel


def check_channel(db: Database, *, project_id: uuid.UUID, channel: str) -> None:
    with db.read() as session:
        found = session.scalar(
            select(Channel.name).where(Channel.project_id == project_id, Channel.name == channel)
        )
    if found is None:
        raise InvalidInput(f"unknown channel {channel!r}", code="invalid_channel")


async def upload_bundle(
    *,
    db: Database,
    store: BundleStore,
    project_id: uuid.UUID,
    staged: StagedUpload,
    zip_limits: ZipLimits | None = None,
) -> Bundle:
    """Validate the staged upload, store it under a new version and record it, or leave nothing."""
    fields = staged.fields
    channel = fields.get("channel", "").strip() or "production"
    mandatory = (
        parse_bool(fields["mandatory"], field="mandatory") if "mandatory" in fields else False
    )
    release_notes = fields.get("release_notes") or None
    if release_notes is not None and len(release_notes) > MAX_RELEASE_NOTES:
        raise InvalidInput(
            f"release_notes is longer than {MAX_RELEASE_NOTES} characters",
            code="invalid_release_notes",
        )
    if staged.bundle_path is None:
        raise InvalidInput("the form has no 'bundle' file", code="missing_bundle")
    await _db(lambda: check_channel(db, project_id=project_id, channel=channel))
    bundle_path = staged.bundle_path
    await anyio.to_thread.run_sync(lambda: validate_zip(bundle_path, limits=zip_limits))

    # 1. Allocate the version and record the object we are about to store, in one transaction:
    #    a crash after this leaves a record for `gc`, never an unrecorded file.
    def allocate() -> str:
        with db.write() as session:
            row = _channel_for_update(session, project_id=project_id, name=channel)
            row.last_version += 1
            path = storage_path(project_id=project_id, channel=channel, version=row.last_version)
            session.add(PendingObject(storage_path=path, reason="upload", created_at=utcnow()))
            return path

    path = await _db(allocate)
    version = int(path.rsplit("/v", 1)[1].removesuffix(".zip"))

    # 2. Store the file. If that fails nothing references it; drop the record.
    try:
        await store.put_file(path, bundle_path)
    except BaseException:
        await _forget_pending(db, path)
        raise

    # 3. Insert the row and clear the record together.
    def record() -> Bundle:
        now = utcnow()
        bundle = Bundle(
            id=uuid.uuid4(),
            project_id=project_id,
            channel=channel,
            version=version,
            checksum="sha256:" + staged.sha256,
            storage_path=path,
            file_size=staged.bundle_size,
            mandatory=mandatory,
            active=False,
            release_notes=release_notes,
            created_at=now,
            updated_at=now,
        )
        with db.write() as session:
            session.add(bundle)
            session.execute(delete(PendingObject).where(PendingObject.storage_path == path))
        return bundle

    try:
        return await _db(record)
    except BaseException:
        # The row is not there, so the file must not be either; if removing it fails too the
        # pending record stays and `gc` removes the file later.
        try:
            await store.delete(path)
        except Exception:
            logger.warning("could not remove %s after a failed upload; left for gc", path)
        else:
            await _forget_pending(db, path)
        raise


async def _forget_pending(db: Database, path: str) -> None:
    def forget() -> None:
        with db.write() as session:
            session.execute(delete(PendingObject).where(PendingObject.storage_path == path))

    try:
        await _db(forget)
    except OTAError:
        logger.warning("could not clear the pending record of %s; gc will", path)


def list_bundles(db: Database, *, project_id: uuid.UUID) -> list[Bundle]:
    """Every bundle of the project, by channel, newest version first."""
    with db.read() as session:
        query = (
            select(Bundle)
            .where(Bundle.project_id == project_id)
            .order_by(Bundle.channel, Bundle.version.desc())
        )
        return list(session.scalars(query))


def _bundle(session: Session, *, project_id: uuid.UUID, bundle_id: uuid.UUID) -> Bundle:
    bundle = session.scalar(
        select(Bundle).where(Bundle.id == bundle_id, Bundle.project_id == project_id)
    )
    if bundle is None:
        raise NotFound("bundle not found", code="bundle_not_found")
    return bundle


def get_bundle(db: Database, *, project_id: uuid.UUID, bundle_id: uuid.UUID) -> Bundle:
    with db.read() as session:
        return _bundle(session, project_id=project_id, bundle_id=bundle_id)


def activate_bundle(db: Database, *, project_id: uuid.UUID, bundle_id: uuid.UUID) -> Bundle:
    """Make the bundle its channel's only active bundle; activating it again changes nothing."""
    with db.write() as session:
        bundle = _bundle(session, project_id=project_id, bundle_id=bundle_id)
        _channel_for_update(session, project_id=project_id, name=bundle.channel)
        session.refresh(bundle)
        if bundle.active:
            return bundle
        now = _later(bundle.updated_at)
        session.execute(
            update(Bundle)
            .where(Bundle.project_id == project_id, Bundle.channel == bundle.channel, Bundle.active)
            .values(active=False, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        bundle.active = True
        bundle.updated_at = now
        if bundle.released_at is None:
            bundle.released_at = now
    return bundle


def set_mandatory(
    db: Database, *, project_id: uuid.UUID, bundle_id: uuid.UUID, mandatory: bool | None
) -> Bundle:
    """Set the flag, or toggle it when `mandatory` is None."""
    with db.write() as session:
        bundle = _bundle(session, project_id=project_id, bundle_id=bundle_id)
        bundle.mandatory = (not bundle.mandatory) if mandatory is None else mandatory
        bundle.updated_at = _later(bundle.updated_at)
    return bundle


async def delete_bundle(
    *, db: Database, store: BundleStore, project_id: uuid.UUID, bundle_id: uuid.UUID
) -> None:
    """Remove the row, then the file; a file that cannot be removed stays recorded for `gc`."""

    # The row goes first, with a record of its file in the same transaction: a crash after
    # this leaves a recorded file (gc removes it), never a row whose file is gone.
    def remove_row() -> str:
        with db.write() as session:
            bundle = _bundle(session, project_id=project_id, bundle_id=bundle_id)
            path = bundle.storage_path
            session.delete(bundle)
            session.merge(PendingObject(storage_path=path, reason="delete", created_at=utcnow()))
            return path

    path = await _db(remove_row)
    try:
        await store.delete(path)
    except Exception:
        logger.warning("could not delete %s from the store; recorded for gc", path)
        return
    await _forget_pending(db, path)
