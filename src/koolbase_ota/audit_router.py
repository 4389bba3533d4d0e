"""`GET /v1/projects/{project_id}/audit`: a project's audit trail, newest first."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, WithJsonSchema, field_serializer
from starlette.concurrency import run_in_threadpool

from koolbase_ota import audit
from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.clock import rfc3339
from koolbase_ota.deps import ContextDep, ProjectDep
from koolbase_ota.errors import InvalidInput

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
    responses={status: {"model": ErrorOut} for status in (400, 401, 404)},
    summary="The project's audit trail: who changed what, newest first",
    description="Every change made to the project, as `action`: `bundle.upload`, "
    "`bundle.activate`, `bundle.mandatory`, `bundle.update` (targeting, rollout), "
    "`bundle.recall`, `bundle.promote`, `bundle.delete`, `channel.add`, `token.create`, "
    "`token.revoke`, `key.rotate` and `project.create`. `actor` is `token:<token id>` for a "
    "change made through the API and `cli` for one made with the command line.",
)
async def list_audit_events(
    project_id: ProjectDep,
    context: ContextDep,
    limit: Annotated[
        _LimitText | None,
        Query(
            description=f"At most this many events (1 to {audit.MAX_LIMIT}; "
            f"default {audit.DEFAULT_LIMIT})."
        ),
    ] = None,
) -> list[AuditEventOut]:
    events = await run_in_threadpool(
        audit.list_events, context.db, project_id=project_id, limit=_limit(limit)
    )
    return [AuditEventOut.of(event) for event in events]


def _limit(raw: str | None) -> int:
    """The `limit` query parameter: plain decimal digits; the service checks the range."""
    if raw is None:
        return audit.DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 7):
        raise InvalidInput(
            f"limit must be a whole number from 1 to {audit.MAX_LIMIT}", code="invalid_limit"
        )
    return int(raw)
