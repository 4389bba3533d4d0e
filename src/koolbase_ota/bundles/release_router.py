"""Dashboard route to promote a bundle: a server-side copy into a channel as a new version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from koolbase_ota.bundles import promote
from koolbase_ota.bundles.schemas import BundleOut, ErrorOut
from koolbase_ota.deps import ContextDep, DashboardDep, json_object, parse_id

router = APIRouter(prefix="/v1/projects/{project_id}/ota", tags=["bundles"])


class PromoteIn(BaseModel):
    """Documents the body only: the route checks it itself, so each bad field gets its own code."""

    model_config = ConfigDict(extra="forbid")

    channel: str = Field(
        description="The channel to copy into: another one, or the bundle's own (a re-release)",
        examples=["production"],
    )
    activate: bool = Field(default=False, description="Make the copy its channel's head at once")
    rollout_percentage: int | None = Field(
        default=None, ge=1, le=100, description="The copy's rollout (default 100)"
    )
    release_notes: str | None = Field(
        default=None,
        max_length=10_000,
        description="The copy's release notes; absent: the source's; null: none",
    )
    mandatory: bool = Field(default=False, description="The copy's mandatory flag")


_PROMOTE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "A bad body, or an unknown channel"},
    401: {"model": ErrorOut},
    404: {"model": ErrorOut, "description": "No such project or bundle"},
    409: {"model": ErrorOut, "description": "`bundle_recalled`: a recalled bundle"},
    503: {"model": ErrorOut, "description": "The database or the store is unavailable"},
}


@router.post(
    "/bundles/{bundle_id}/promote",
    status_code=201,
    response_model=BundleOut,
    responses=_PROMOTE_ERRORS,
    summary="Copy a bundle into a channel as a new version (promote, or re-release to roll back)",
    description="The copy gets the target channel's next version, the same checksum and size, "
    "the source's targeting and (unless given) release notes, and `promoted_from` = the "
    "source's id. The file is copied inside the store: nothing is uploaded again. With "
    '`"activate": true` the copy becomes the channel\'s head, at `rollout_percentage` when '
    "given. Promoting a bundle into its own channel and activating it rolls every device back "
    "to its content, seed SDKs included. A recalled bundle is refused.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PromoteIn.model_json_schema()}},
        }
    },
)
async def promote_bundle(
    bundle_id: str, request: Request, dashboard: DashboardDep, context: ContextDep
) -> BundleOut:
    parsed_id = parse_id(bundle_id, what="bundle")
    promotion = promote.parse_promotion(
        json_object(await request.body(), expected='{"channel": "...", ...}', fields=promote.FIELDS)
    )
    bundle = await promote.promote_bundle(
        db=context.db,
        store=context.store,
        project_id=dashboard.project_id,
        bundle_id=parsed_id,
        promotion=promotion,
        actor=dashboard.actor,
    )
    # This process's checks see an activated copy at once; the others within their refresh.
    await context.show_change()
    return BundleOut.of(bundle)
