"""Dashboard routes for a project's channels: list them, add one."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_serializer
from starlette.concurrency import run_in_threadpool

from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.clock import rfc3339
from koolbase_ota.deps import ContextDep, DashboardDep, ProjectDep, json_object
from koolbase_ota.errors import InvalidInput
from koolbase_ota.projects import channels

router = APIRouter(prefix="/v1/projects/{project_id}/ota", tags=["channels"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut} for status in (400, 401, 404)
}


class ChannelOut(BaseModel):
    name: str
    created_at: dt.datetime
    builtin: bool = Field(description="One of the seed channels every project has")

    @field_serializer("created_at")
    def _timestamp(self, value: dt.datetime) -> str:
        return rfc3339(value)

    @classmethod
    def of(cls, info: channels.ChannelInfo) -> ChannelOut:
        return cls(name=info.name, created_at=info.created_at, builtin=info.builtin)


class ChannelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=f"^{channels.NAME_RULE.pattern}$",
        examples=["stable"],
        description="1 to 50 characters of a-z, 0-9, `.`, `_` and `-`, starting with a letter "
        "or digit",
    )


@router.get(
    "/channels",
    response_model=list[ChannelOut],
    responses={status: {"model": ErrorOut} for status in (401, 404)},
    summary="List the project's channels: the seed channels first, then its own by name",
)
async def list_channels(project_id: ProjectDep, context: ContextDep) -> list[ChannelOut]:
    found = await run_in_threadpool(channels.list_channels, context.db, project_id=project_id)
    return [ChannelOut.of(info) for info in found]


@router.post(
    "/channels",
    status_code=201,
    response_model=ChannelOut,
    responses={**_ERRORS, 409: {"model": ErrorOut}},
    summary="Add a channel to the project (for example `stable` or `beta`)",
    description="Its versions start at 1. A channel cannot be removed: its row keeps the "
    "version counter that makes sure no version number is ever given out twice. 409 "
    "`channel_exists` for a name the project has, `too_many_channels` past "
    f"{channels.MAX_CHANNELS}.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ChannelIn.model_json_schema()}},
        }
    },
)
async def add_channel(request: Request, dashboard: DashboardDep, context: ContextDep) -> ChannelOut:
    name = _name_from(await request.body())
    info = await run_in_threadpool(
        channels.add_channel,
        context.db,
        project_id=dashboard.project_id,
        name=name,
        actor=dashboard.actor,
    )
    # This process's checks see the new channel at once; the others within their refresh.
    await context.show_change()
    return ChannelOut.of(info)


def _name_from(body: bytes) -> str:
    """`{"name": "..."}`, parsed here so that every mistake gets our own error code."""
    data = json_object(body, expected='{"name": "..."}', fields=("name",))
    name = data.get("name")
    if not isinstance(name, str):
        raise InvalidInput("name is required and must be a string", code="invalid_channel")
    return channels.check_name(name)
