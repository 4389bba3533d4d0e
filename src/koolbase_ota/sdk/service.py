"""Database lookups for what devices fetch; the check itself is answered from `sdk.cache`."""

from __future__ import annotations

from sqlalchemy import select

from koolbase_ota.bundles.models import Bundle
from koolbase_ota.db import Database


def checksum_at(db: Database, *, storage_path: str) -> str | None:
    """The checksum of the bundle stored at `storage_path`, or None once it is deleted."""
    with db.read() as session:
        return session.scalar(select(Bundle.checksum).where(Bundle.storage_path == storage_path))
