"""The bundles table and the ledger of stored objects awaiting cleanup."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from koolbase_ota.db import Base, UTCDateTime, utcnow


class Bundle(Base):
    __tablename__ = "bundles"
    __table_args__ = (
        UniqueConstraint("project_id", "channel", "version"),
        ForeignKeyConstraint(
            ["project_id", "channel"],
            ["channels.project_id", "channels.name"],
            ondelete="CASCADE",
        ),
        # The database itself holds "at most one active bundle per (project, channel)".
        Index(
            "uq_bundles_one_active",
            "project_id",
            "channel",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    project_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    channel: Mapped[str] = mapped_column(String(50))
    version: Mapped[int] = mapped_column(Integer)
    checksum: Mapped[str] = mapped_column(String(71))
    storage_path: Mapped[str] = mapped_column(String(300), unique=True)
    file_size: Mapped[int] = mapped_column(BigInteger)
    mandatory: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    release_notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set the first time the bundle is activated; a released mandatory bundle keeps forcing
    # devices that skipped it.
    released_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Targeting: None means "any". `platform` is "ios" or "android"; the app versions are
    # dotted numeric ("2.4.1"), inclusive bounds (see `bundles.targeting`).
    platform: Mapped[str | None] = mapped_column(String(10))
    min_app_version: Mapped[str | None] = mapped_column(String(31))
    max_app_version: Mapped[str | None] = mapped_column(String(31))
    # The share of devices (1-100) a release reaches; see `bundles.targeting.in_rollout`.
    rollout_percentage: Mapped[int] = mapped_column(
        Integer, default=100, server_default=text("100")
    )
    # A recalled bundle is never served again; devices on it are sent back.
    recalled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # The bundle this one was promoted (copied) from, if any; no foreign key, the source may go.
    promoted_from: Mapped[uuid.UUID | None] = mapped_column(Uuid)


class PendingObject(Base):
    """A stored object that may have no bundle row: an upload in flight or a failed delete.

    Written before the object is stored (upload) or in the same transaction that removes the
    row (delete), so a crash at any point leaves a record that `koolbase-ota gc` acts on.
    """

    __tablename__ = "pending_objects"

    storage_path: Mapped[str] = mapped_column(String(300), primary_key=True)
    reason: Mapped[str] = mapped_column(String(20))  # "upload" or "delete"
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
