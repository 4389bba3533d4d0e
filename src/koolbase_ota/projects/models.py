"""Tables of projects, environments (each with its public key) and dashboard tokens."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import ForeignKey, Integer, String, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from koolbase_ota.db import Base, UTCDateTime, utcnow


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Environment(Base):
    """One of a project's environments; its public key is what apps send as `x-api-key`."""

    __tablename__ = "environments"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    project_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(50))
    # Only a SHA-256 of the key is kept; the prefix (`pk_live_1a2b`) lets people tell keys apart.
    public_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    public_key_prefix: Mapped[str] = mapped_column(String(20))
    key_rotated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class DashboardToken(Base):
    __tablename__ = "dashboard_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    project_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_prefix: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Channel(Base):
    """A project's channel and its version counter, which only ever grows."""

    __tablename__ = "channels"

    project_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    # Nullable in the schema only because SQLite cannot add a NOT NULL column to a table that
    # others reference without rebuilding it; migration 0005 fills it for every existing row.
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=True, default=utcnow)
