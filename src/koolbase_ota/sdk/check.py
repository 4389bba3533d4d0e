"""`GET /v1/sdk/ota/check`: the hot path every installed app calls at launch.

Kept in a module of its own so it can leave FastAPI's per-request machinery for speed without
touching anything else.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.security import APIKeyHeader
from pydantic import BaseModel
from starlette.responses import JSONResponse

from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.deps import ContextDep
from koolbase_ota.errors import Unauthorized
from koolbase_ota.projects import service as projects
from koolbase_ota.sdk import service

router = APIRouter(tags=["sdk"])

_api_key = APIKeyHeader(
    name="x-api-key", auto_error=False, description="An environment's public key: `pk_live_...`"
)
# Devices must not get an answer from a shared cache: it differs per key and changes at once.
_HEADERS = {"Cache-Control": "no-store"}


class CheckOut(BaseModel):
    """`{"has_update": false}`, or the offer with every other field."""

    has_update: bool
    version: int | None = None
    checksum: str | None = None
    mandatory: bool | None = None
    download_url: str | None = None
    release_notes: str | None = None
    file_size: int | None = None


@router.get(
    "/v1/sdk/ota/check",
    response_model=CheckOut,
    responses={400: {"model": ErrorOut}, 401: {"model": ErrorOut}},
    summary="Check for a newer active bundle; returns a download URL if there is one",
)
def check(
    context: ContextDep,
    api_key: Annotated[str | None, Depends(_api_key)],
    channel: Annotated[str | None, Query(max_length=50)] = None,
    version: Annotated[
        str | None, Query(max_length=30, description="The version the device has")
    ] = None,
) -> JSONResponse:
    if not api_key:
        raise Unauthorized("missing x-api-key header", code="missing_api_key")
    project_id = projects.project_for_public_key(context.db, public_key=api_key)
    if project_id is None:
        raise Unauthorized("invalid API key", code="invalid_api_key")
    current = service.parse_version(version)
    release = service.find_update(
        context.db,
        project_id=project_id,
        channel=channel or "production",
        current_version=current,
    )
    if release is None:
        return JSONResponse({"has_update": False}, headers=_HEADERS)
    url = context.store.download_url(
        release.storage_path, ttl_seconds=context.settings.url_ttl_seconds
    )
    return JSONResponse(
        {
            "has_update": True,
            "version": release.version,
            "checksum": release.checksum,
            "mandatory": release.mandatory,
            "download_url": url,
            "release_notes": release.release_notes,
            "file_size": release.file_size,
        },
        headers=_HEADERS,
    )
