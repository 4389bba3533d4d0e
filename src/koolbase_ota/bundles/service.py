"""Upload, list, activate, target, recall, set mandatory and delete bundles."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio.to_thread
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from sqlalchemy.orm import Session

from koolbase_ota import audit, changes, paging
from koolbase_ota.bundles import targeting
from koolbase_ota.bundles.models import Bundle, PendingObject
from koolbase_ota.bundles.multipart import MAX_RELEASE_NOTES, StagedUpload
from koolbase_ota.bundles.validation import ZipLimits, validate_zip
from koolbase_ota.db import Database, database_now, utcnow
from koolbase_ota.errors import Conflict, DatabaseUnavailable, InvalidInput, NotFound, OTAError
from koolbase_ota.projects import channels
from koolbase_ota.projects.models import Channel
from koolbase_ota.storage import BundleStore, StoreOutcomeUnknown

logger = logging.getLogger(__name__)

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
    raise InvalidInput(f"{field} must be true or false (or 1/0, yes/no)", code=f"invalid_{field}")


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


def lock_channel(session: Session, *, project_id: uuid.UUID, name: str) -> Channel:
    """Lock the channel row; every change to a channel's bundles queues on it."""
    channel = session.scalar(
        select(Channel)
        .where(Channel.project_id == project_id, Channel.name == name)
        .with_for_update()
    )
    if channel is None:
        raise InvalidInput(f"unknown channel {name!r}", code="invalid_channel")
    return channel


def check_release_notes(notes: str | None) -> str | None:
    """Release notes within their bound, and without NUL, which PostgreSQL text cannot hold."""
    if notes is None:
        return None
    if len(notes) > MAX_RELEASE_NOTES:
        raise InvalidInput(
            f"release_notes is longer than {MAX_RELEASE_NOTES} characters",
            code="invalid_release_notes",
        )
    if "\x00" in notes:
        raise InvalidInput(
            "release_notes must not contain NUL characters", code="invalid_release_notes"
        )
    return notes


def check_channel(db: Database, *, project_id: uuid.UUID, channel: str) -> None:
    """Refuse a channel the project does not have; one no channel could be named is refused
    before the database is asked (PostgreSQL refuses a NUL in a query with an error)."""
    if not channels.NAME_RULE.fullmatch(channel):
        raise InvalidInput(f"unknown channel {channel!r}", code="invalid_channel")
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
    actor: str = audit.CLI,
) -> Bundle:
    """Validate the staged upload, store it under a new version and record it, or leave nothing."""
    fields = staged.fields
    channel = fields.get("channel", "").strip() or "production"
    mandatory = (
        parse_bool(fields["mandatory"], field="mandatory") if "mandatory" in fields else False
    )
    release_notes = check_release_notes(fields.get("release_notes") or None)
    platform = targeting.parse_platform(fields.get("platform"))
    min_app_version = targeting.parse_app_version(
        fields.get("min_app_version"), field="min_app_version"
    )
    max_app_version = targeting.parse_app_version(
        fields.get("max_app_version"), field="max_app_version"
    )
    targeting.check_range(min_app_version, max_app_version)
    if staged.bundle_path is None:
        raise InvalidInput("the form has no 'bundle' file", code="missing_bundle")
    await _db(lambda: check_channel(db, project_id=project_id, channel=channel))
    bundle_path = staged.bundle_path
    await anyio.to_thread.run_sync(lambda: validate_zip(bundle_path, limits=zip_limits))

    # 1. Allocate the version and record the object we are about to store, in one transaction:
    #    a crash after this leaves a record for `gc`, never an unrecorded file.
    def allocate() -> str:
        with db.write() as session:
            row = lock_channel(session, project_id=project_id, name=channel)
            row.last_version += 1
            path = storage_path(project_id=project_id, channel=channel, version=row.last_version)
            session.add(
                PendingObject(storage_path=path, reason="upload", created_at=database_now(session))
            )
            return path

    path = await _db(allocate)
    version = int(path.rsplit("/v", 1)[1].removesuffix(".zip"))

    # 2. Store the file. If that fails nothing references it; drop the record, unless the
    #    store may still finish the write (a timed-out PUT): then the record stays and `gc`
    #    removes whatever lands.
    try:
        await store.put_file(path, bundle_path)
    except StoreOutcomeUnknown:
        logger.warning("storing %s failed midway; left recorded for gc", path)
        raise
    except BaseException:
        await _forget_pending(db, path)
        raise

    # 3. Insert the row and clear the record together.
    committing = False

    def record() -> Bundle:
        nonlocal committing
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
            platform=platform,
            min_app_version=min_app_version,
            max_app_version=max_app_version,
            rollout_percentage=100,
        )
        with db.write() as session:
            session.add(bundle)
            session.execute(delete(PendingObject).where(PendingObject.storage_path == path))
            audit.record(
                session,
                project_id=project_id,
                actor=actor,
                action=audit.BUNDLE_UPLOAD,
                target=str(bundle.id),
                details={
                    "channel": channel,
                    "version": version,
                    "mandatory": mandatory,
                    "checksum": bundle.checksum,
                    "file_size": bundle.file_size,
                    **_targeting_details(bundle),
                },
            )
            session.flush()
            committing = True
        return bundle

    try:
        return await _db(record)
    except BaseException as exc:
        found = await settle_failed_record(
            db=db, store=store, path=path, committing=committing, what="upload"
        )
        if found is None or not isinstance(exc, Exception):
            raise
        return found


async def settle_failed_record(
    *, db: Database, store: BundleStore, path: str, committing: bool, what: str
) -> Bundle | None:
    """After writing the row of the object stored at `path` failed: the row, if it was written
    after all; else None, with the object removed or left recorded for `gc`.

    A failure before COMMIT wrote nothing, so the object goes (if removing it fails too, its
    pending record stays and `gc` removes it). One during COMMIT may have written the row, the
    answer being what was lost: the database is asked, and while it cannot say, object and
    record stay, for `gc` to decide by the rows it finds.
    """
    if committing:

        def find() -> Bundle | None:
            with db.read() as session:
                return session.scalar(select(Bundle).where(Bundle.storage_path == path))

        try:
            found = await _db(find)
        except OTAError:
            logger.warning("could not tell whether %s was recorded; left for gc", path)
            return None
        if found is not None:
            logger.warning("the %s of %s was recorded after all", what, path)
            return found
    try:
        await store.delete(path)
    except Exception:
        logger.warning("could not remove %s after a failed %s; left for gc", path, what)
    else:
        await _forget_pending(db, path)
    return None


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


#: The largest page a client may ask for, and the page size when only a cursor is given.
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
_MAX_VERSION = 2**31 - 1  # the column is a 32-bit integer


@dataclass(frozen=True)
class BundlePage:
    """One page of the list, and the cursor of the next page when more bundles remain."""

    bundles: list[Bundle]
    next_cursor: str | None


def encode_cursor(*, channel: str, version: int) -> str:
    """The opaque position just after (channel, version) in the list's order."""
    return paging.encode_cursor([channel, version])


def decode_cursor(cursor: str) -> tuple[str, int]:
    """The (channel, version) a cursor points after; anything not in our exact form is refused."""
    channel, version = paging.decode_cursor(cursor, 2)
    if (
        not isinstance(channel, str)
        or not 0 < len(channel) <= 50
        or type(version) is not int
        or not 0 <= version <= _MAX_VERSION
    ):
        raise paging.invalid_cursor()
    return channel, version


def list_bundle_page(
    db: Database, *, project_id: uuid.UUID, limit: int, cursor: str | None = None
) -> BundlePage:
    """Up to `limit` bundles in the list's order, starting after `cursor` when one is given.

    A keyset walk, one channel at a time: each step is a range scan of the unique index on
    (project_id, channel, version), read backwards, so a page deep in a long list costs what the
    first page costs (one query when the page lies within a channel). A single query ordered by
    `channel ASC, version DESC` cannot use that ascending index for both columns and would sort
    the rest of the channel for every page.
    """
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be 1 to {MAX_PAGE_SIZE}", code="invalid_limit")
    wanted = limit + 1  # one more than asked for tells whether another page follows
    found: list[Bundle] = []
    channel: str | None
    below: int | None
    with db.read() as session:
        if cursor:
            channel, below = decode_cursor(cursor)
        else:
            channel, below = _next_channel(session, project_id=project_id, after=None), None
        while channel is not None and len(found) < wanted:
            query = select(Bundle).where(Bundle.project_id == project_id, Bundle.channel == channel)
            if below is not None:
                query = query.where(Bundle.version < below)
            query = query.order_by(Bundle.version.desc()).limit(wanted - len(found))
            found.extend(session.scalars(query))
            if len(found) < wanted:
                channel, below = _next_channel(session, project_id=project_id, after=channel), None
    page = found[:limit]
    if len(found) <= limit:
        return BundlePage(bundles=page, next_cursor=None)
    last = page[-1]
    return BundlePage(
        bundles=page, next_cursor=encode_cursor(channel=last.channel, version=last.version)
    )


def _next_channel(session: Session, *, project_id: uuid.UUID, after: str | None) -> str | None:
    """The first channel after `after` (or the first at all) that holds bundles of the project."""
    query = select(func.min(Bundle.channel)).where(Bundle.project_id == project_id)
    if after is not None:
        query = query.where(Bundle.channel > after)
    return session.scalar(query)


def _bundle(session: Session, *, project_id: uuid.UUID, bundle_id: uuid.UUID) -> Bundle:
    bundle = session.scalar(
        select(Bundle).where(Bundle.id == bundle_id, Bundle.project_id == project_id)
    )
    if bundle is None:
        raise NotFound("bundle not found", code="bundle_not_found")
    return bundle


def _locked_bundle(session: Session, *, project_id: uuid.UUID, bundle_id: uuid.UUID) -> Bundle:
    """The bundle, read again once its channel is locked.

    Every change to a channel's bundles, delete included, queues on that lock; a change that
    waited behind a delete finds the bundle gone (404) rather than writing to a missing row.
    """
    bundle = _bundle(session, project_id=project_id, bundle_id=bundle_id)
    lock_channel(session, project_id=project_id, name=bundle.channel)
    locked = session.scalar(
        select(Bundle)
        .where(Bundle.id == bundle_id, Bundle.project_id == project_id)
        .execution_options(populate_existing=True)
    )
    if locked is None:
        raise NotFound("bundle not found", code="bundle_not_found")
    return locked


def _targeting_details(bundle: Bundle) -> dict[str, object]:
    """The targeting fields that are set, for audit details."""
    return {
        name: value
        for name, value in (
            ("platform", bundle.platform),
            ("min_app_version", bundle.min_app_version),
            ("max_app_version", bundle.max_app_version),
        )
        if value is not None
    }


def activate_bundle(
    db: Database,
    *,
    project_id: uuid.UUID,
    bundle_id: uuid.UUID,
    rollout_percentage: int | None = None,
    actor: str = audit.CLI,
) -> Bundle:
    """Make the bundle its channel's head (its only active bundle), optionally at a rollout.

    Without `rollout_percentage`, activating the active bundle again changes nothing; with it,
    the percentage is set (a change only if it differs).
    """
    with db.write() as session:
        bundle = _locked_bundle(session, project_id=project_id, bundle_id=bundle_id)
        activate_in_session(session, bundle, rollout_percentage=rollout_percentage, actor=actor)
    return bundle


def activate_in_session(
    session: Session, bundle: Bundle, *, rollout_percentage: int | None, actor: str
) -> None:
    """Activate inside the caller's transaction, which holds the channel's lock already."""
    if bundle.recalled_at is not None:
        raise Conflict(
            "the bundle is recalled and cannot be released again; release a fixed bundle, or"
            " promote an older good one, instead",
            code="bundle_recalled",
        )
    if rollout_percentage is not None:
        rollout_percentage = targeting.parse_rollout_percentage(rollout_percentage)
    project_id = bundle.project_id
    rollout_before = bundle.rollout_percentage
    if bundle.active:
        if rollout_percentage is None or rollout_percentage == rollout_before:
            return
        bundle.rollout_percentage = rollout_percentage
        bundle.updated_at = _later(bundle.updated_at)
        _changed(
            session,
            bundle,
            actor=actor,
            action=audit.BUNDLE_UPDATE,
            rollout_percentage={"from": rollout_before, "to": rollout_percentage},
        )
        return
    previous = session.scalar(
        select(Bundle.id).where(
            Bundle.project_id == project_id, Bundle.channel == bundle.channel, Bundle.active
        )
    )
    now = _later(bundle.updated_at)
    session.execute(
        update(Bundle)
        .where(Bundle.project_id == project_id, Bundle.channel == bundle.channel, Bundle.active)
        .values(active=False, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    # The bulk update bypassed the session: make a loaded previous head see it.
    session.flush()
    bundle.active = True
    bundle.updated_at = now
    if rollout_percentage is not None:
        bundle.rollout_percentage = rollout_percentage
    if bundle.released_at is None:
        bundle.released_at = now
    details: dict[str, object] = {"deactivated": str(previous) if previous is not None else None}
    if rollout_percentage is not None:
        details["rollout_percentage"] = rollout_percentage
    _changed(session, bundle, actor=actor, action=audit.BUNDLE_ACTIVATE, **details)


#: What PATCH may change besides `mandatory`.
UPDATABLE = ("platform", "min_app_version", "max_app_version", "rollout_percentage")


def update_bundle(
    db: Database,
    *,
    project_id: uuid.UUID,
    bundle_id: uuid.UUID,
    fields: dict[str, object],
    actor: str = audit.CLI,
) -> Bundle:
    """Change targeting and rollout (PATCH); a `mandatory` key sets the flag as `set_mandatory`.

    A targeting field given as None clears it. Everything is validated before anything changes.
    """
    unknown = set(fields) - {*UPDATABLE, "mandatory"}
    if unknown:
        raise InvalidInput(f"unknown fields: {', '.join(sorted(unknown))}", code="invalid_body")
    wanted: dict[str, object] = {}
    if "platform" in fields:
        wanted["platform"] = targeting.parse_platform(_text_or_none(fields["platform"]))
    for name in ("min_app_version", "max_app_version"):
        if name in fields:
            wanted[name] = targeting.parse_app_version(_text_or_none(fields[name]), field=name)
    if "rollout_percentage" in fields:
        wanted["rollout_percentage"] = targeting.parse_rollout_percentage(
            fields["rollout_percentage"]
        )
    mandatory = fields.get("mandatory")
    if mandatory is None and "mandatory" in fields:
        # Beside other fields, null toggled the flag: a client that sends the whole object
        # back with its targeting cleared (null) flipped it on every save.
        raise InvalidInput(
            "mandatory must be true or false (leave it out to keep the flag as it is)",
            code="invalid_mandatory",
        )
    if mandatory is not None and not isinstance(mandatory, bool):
        raise InvalidInput("mandatory must be true or false", code="invalid_mandatory")
    with db.write() as session:
        bundle = _locked_bundle(session, project_id=project_id, bundle_id=bundle_id)
        targeting.check_range(
            wanted.get("min_app_version", bundle.min_app_version),  # type: ignore[arg-type]
            wanted.get("max_app_version", bundle.max_app_version),  # type: ignore[arg-type]
        )
        changed = {
            name: {"from": getattr(bundle, name), "to": value}
            for name, value in wanted.items()
            if getattr(bundle, name) != value
        }
        for name, value in wanted.items():
            setattr(bundle, name, value)
        if changed:
            bundle.updated_at = _later(bundle.updated_at)
            changes.record(
                session, project_id=project_id, kind=changes.BUNDLES, channel=bundle.channel
            )
            audit.record(
                session,
                project_id=project_id,
                actor=actor,
                action=audit.BUNDLE_UPDATE,
                target=str(bundle.id),
                details={"channel": bundle.channel, "version": bundle.version, **changed},
            )
        if mandatory is not None:
            _set_mandatory(session, bundle, mandatory=mandatory, actor=actor)
    return bundle


def _text_or_none(value: object) -> object:
    """JSON null clears a field; anything else goes to the field's own parser."""
    if isinstance(value, str) and not value.strip():
        raise InvalidInput(
            "an empty string is not a value; send null to clear", code="invalid_body"
        )
    return value


def recall_bundle(
    db: Database, *, project_id: uuid.UUID, bundle_id: uuid.UUID, actor: str = audit.CLI
) -> Bundle:
    """Never serve the bundle again; recalling it twice changes nothing.

    When it is its channel's head, the newest released, non-recalled bundle of a lower version
    becomes the head, so the channel keeps serving; with none, the channel has no head.
    """
    with db.write() as session:
        bundle = _locked_bundle(session, project_id=project_id, bundle_id=bundle_id)
        if bundle.recalled_at is not None:
            return bundle
        now = _later(bundle.updated_at)
        was_active = bundle.active
        bundle.recalled_at = now
        bundle.updated_at = now
        new_head: Bundle | None = None
        if was_active:
            bundle.active = False
            session.flush()  # the unique "one active" index must see the old head go first
            new_head = session.scalar(
                select(Bundle)
                .where(
                    Bundle.project_id == project_id,
                    Bundle.channel == bundle.channel,
                    Bundle.version < bundle.version,
                    Bundle.released_at.is_not(None),
                    Bundle.recalled_at.is_(None),
                )
                .order_by(Bundle.version.desc())
                .limit(1)
            )
            if new_head is not None:
                new_head.active = True
                new_head.updated_at = _later(new_head.updated_at)
        _changed(
            session,
            bundle,
            actor=actor,
            action=audit.BUNDLE_RECALL,
            was_active=was_active,
            new_head=str(new_head.id) if new_head is not None else None,
            new_head_version=new_head.version if new_head is not None else None,
        )
    return bundle


def set_mandatory(
    db: Database,
    *,
    project_id: uuid.UUID,
    bundle_id: uuid.UUID,
    mandatory: bool | None,
    actor: str = audit.CLI,
) -> Bundle:
    """Set the flag, or toggle it when `mandatory` is None."""
    with db.write() as session:
        bundle = _locked_bundle(session, project_id=project_id, bundle_id=bundle_id)
        _set_mandatory(session, bundle, mandatory=mandatory, actor=actor)
    return bundle


def _changed(
    session: Session, bundle: Bundle, *, actor: str, action: str, **details: object
) -> None:
    """A change to `bundle` devices may see: logged for every process's cache, and audited."""
    changes.record(
        session, project_id=bundle.project_id, kind=changes.BUNDLES, channel=bundle.channel
    )
    audit.record(
        session,
        project_id=bundle.project_id,
        actor=actor,
        action=action,
        target=str(bundle.id),
        details={"channel": bundle.channel, "version": bundle.version, **details},
    )


def _set_mandatory(session: Session, bundle: Bundle, *, mandatory: bool | None, actor: str) -> None:
    was = bundle.mandatory
    bundle.mandatory = (not bundle.mandatory) if mandatory is None else mandatory
    bundle.updated_at = _later(bundle.updated_at)
    _changed(
        session,
        bundle,
        actor=actor,
        action=audit.BUNDLE_MANDATORY,
        mandatory=bundle.mandatory,
        was=was,
    )


async def delete_bundle(
    *,
    db: Database,
    store: BundleStore,
    project_id: uuid.UUID,
    bundle_id: uuid.UUID,
    actor: str = audit.CLI,
) -> None:
    """Remove the row, then the file; a file that cannot be removed stays recorded for `gc`."""

    # The row goes first, with a record of its file in the same transaction: a crash after
    # this leaves a recorded file (gc removes it), never a row whose file is gone.
    def remove_row() -> str:
        with db.write() as session:
            bundle = _locked_bundle(session, project_id=project_id, bundle_id=bundle_id)
            path = bundle.storage_path
            session.delete(bundle)
            changes.record(
                session, project_id=project_id, kind=changes.BUNDLES, channel=bundle.channel
            )
            session.merge(PendingObject(storage_path=path, reason="delete", created_at=utcnow()))
            audit.record(
                session,
                project_id=project_id,
                actor=actor,
                action=audit.BUNDLE_DELETE,
                target=str(bundle_id),
                details={
                    "channel": bundle.channel,
                    "version": bundle.version,
                    "active": bundle.active,
                    "mandatory": bundle.mandatory,
                },
            )
            return path

    path = await _db(remove_row)
    try:
        await store.delete(path)
    except Exception:
        logger.warning("could not delete %s from the store; recorded for gc", path)
        return
    await _forget_pending(db, path)
