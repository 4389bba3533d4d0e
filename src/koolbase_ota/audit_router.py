"""`GET /v1/projects/{project_id}/audit`: a project's audit trail, newest first."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, WithJsonSchema, field_serializer
from starlette.concurrency import run_in_threadpool

from koolbase_ota import audit, paging
from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.clock import rfc3339
from koolbase_ota.deps import ContextDep, ProjectDep, link_next_page, page_headers

router = APIRouter(prefix="/v1/projects/{project_id}", tags=["audit"])


class AuditEventOut(BaseModel):
    """One recorded change."""

    id: uuid.UUID
    project_id: uuid.UUID
    at: dt.datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]

    @field_serializer("at")
    def _timestamp(self, value: dt.datetime) -> str:
        return rfc3339(value)

    @classmethod
    def of(cls, event: audit.Event) -> AuditEventOut:
        return cls(
            id=event.id,
            project_id=event.project_id,
            at=event.at,
            actor=event.actor,
            action=event.action,
            target=event.target,
            details=event.details,
        )


# Documented as the integer it must be, but parsed here so that a bad value gets our own 400
# `invalid_limit` rather than the generic validation error (as the bundle list does).
_LimitText = Annotated[
    str, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": audit.MAX_LIMIT})
]


@router.get(
    "/audit",
    response_model=list[AuditEventOut],
    responses={
        **{status: {"model": ErrorOut} for status in (400, 401, 404)},
        200: {
            "description": "The newest `limit` events older than `cursor`, newest first.",
            "headers": page_headers("older events"),
        },
    },
    summary="The project's audit trail: who changed what, newest first",
    description="Every change made to the project, as `action`: `bundle.upload`, "
    "`bundle.activate`, `bundle.mandatory`, `bundle.update` (targeting, rollout), "
    "`bundle.recall`, `bundle.promote`, `bundle.delete`, `channel.add`, `token.create`, "
    "`token.revoke`, `key.rotate` and `project.create`. `actor` is `token:<token id>` for a "
    "change made through the API and `cli` for one made with the command line.",
)
async def list_audit_events(
    request: Request,
    response: Response,
    project_id: ProjectDep,
    context: ContextDep,
    limit: Annotated[
        _LimitText | None,
        Query(
            description=f"At most this many events (1 to {audit.MAX_LIMIT}; "
            f"default {audit.DEFAULT_LIMIT})."
        ),
    ] = None,
    cursor: Annotated[
        str | None,
        Query(
            description="The `X-Next-Cursor` of the previous page, for the events older than "
            "it; opaque. Empty means the newest events."
        ),
    ] = None,
) -> list[AuditEventOut]:
    size = paging.parse_limit(limit, default=audit.DEFAULT_LIMIT, maximum=audit.MAX_LIMIT)
    page = await run_in_threadpool(
        audit.list_event_page, context.db, project_id=project_id, limit=size, cursor=cursor
    )
    link_next_page(
        request,
        response,
        public_url=context.settings.public_url,
        limit=size,
        cursor=page.next_cursor,
    )
    return [AuditEventOut.of(event) for event in page.events]
