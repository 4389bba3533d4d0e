"""The bundle object exactly as the API document shows it."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

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
    # Additive fields of the release history (issue 6); clients of the seed API ignore them.
    platform: str | None
    min_app_version: str | None
    max_app_version: str | None
    rollout_percentage: int
    released_at: dt.datetime | None
    recalled_at: dt.datetime | None
    promoted_from: uuid.UUID | None

    @field_serializer("created_at", "updated_at")
    def _timestamp(self, value: dt.datetime) -> str:
        return rfc3339(value)

    @field_serializer("released_at", "recalled_at")
    def _optional_timestamp(self, value: dt.datetime | None) -> str | None:
        return None if value is None else rfc3339(value)

    @classmethod
    def of(cls, bundle: Bundle) -> BundleOut:
        return cls.model_validate(bundle)


class MandatoryIn(BaseModel):
    """PATCH body; an empty body toggles the flag instead."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mandatory: bool | None = None


class BundlePatchIn(MandatoryIn):
    """PATCH body: any of these; a targeting field set to null is cleared.

    Documents the body only: the route parses it itself, so that each bad value gets its own
    400 code (`invalid_platform`, `invalid_min_app_version`, `invalid_rollout_percentage`...).
    """

    platform: Literal["ios", "android"] | None = Field(
        default=None, description="Serve only to this platform; null for all"
    )
    min_app_version: str | None = Field(
        default=None,
        description="Lowest app version served, inclusive (dotted numeric: 2.4.1); null clears",
        examples=["2.4.0"],
    )
    max_app_version: str | None = Field(
        default=None, description="Highest app version served, inclusive; null clears"
    )
    rollout_percentage: int | None = Field(
        default=None, ge=1, le=100, description="The share of devices the bundle reaches"
    )


class ActivateIn(BaseModel):
    """Optional activate body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rollout_percentage: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Release to this share of devices (default: the bundle's own, 100 "
        "unless changed)",
    )


class ErrorOut(BaseModel):
    error: str
    code: str
