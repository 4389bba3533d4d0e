"""The bundle object exactly as the API document shows it."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel, ConfigDict, field_serializer

from koolbase_ota.bundles.models import Bundle
from koolbase_ota.clock import rfc3339


class BundleOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    project_id: uuid.UUID
    channel: str
    version: int
    checksum: str
    storage_path: str
    file_size: int
    mandatory: bool
    active: bool
    release_notes: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @field_serializer("created_at", "updated_at")
    def _timestamp(self, value: dt.datetime) -> str:
        return rfc3339(value)

    @classmethod
    def of(cls, bundle: Bundle) -> BundleOut:
        return cls.model_validate(bundle)


class MandatoryIn(BaseModel):
    """PATCH body; an empty body toggles the flag instead."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mandatory: bool | None = None


class ErrorOut(BaseModel):
    error: str
    code: str
