"""`GET /v1/code-push/check`: the check of the vendor's later SDKs (Flutter v4+, React Native).

Same release logic and cache as the seed check (`sdk.check`), another wire format:
`{"status": "no_update"}`, `{"status": "update_available", "bundle": {...}}` or
`{"status": "rollback", "revert_to": N}` (0: back to the app's built-in assets). Served by a
bare ASGI callable in front of the framework; the FastAPI route documents it in OpenAPI.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.types import Scope

from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.deps import ContextDep
from koolbase_ota.ratelimit import RateLimits
from koolbase_ota.sdk.cache import CODE_PUSH_ROUTE, CheckCache
from koolbase_ota.sdk.check import (
    CheckEndpoint,
    CheckRequest,
    Resolved,
    api_key_header,
    documented_answer,
    key_value,
)
from koolbase_ota.security import RATE_LIMITED_RESPONSE

CODE_PUSH_PATH = CODE_PUSH_ROUTE
DEFAULT_CHANNEL = "stable"


def is_code_push(scope: Scope) -> bool:
    return bool(
        scope["type"] == "http" and scope["path"] == CODE_PUSH_PATH and scope["method"] == "GET"
    )


class CodePushEndpoint(CheckEndpoint):
    """Answers a GET of CODE_PUSH_PATH without the framework."""

    path = CODE_PUSH_PATH

    def __init__(
        self,
        cache: CheckCache,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        limits: RateLimits | None = None,
    ) -> None:
        super().__init__(cache, extra_headers, limits)
        self.tally = cache.code_push_tally

    def request(self, api_key: str | None, query: dict[str, str]) -> CheckRequest:
        return CheckRequest(
            api_key=key_value(api_key),
            channel=query.get("channel") or DEFAULT_CHANNEL,
            version=query.get("current_bundle") or None,
            version_error="invalid_current_bundle",
            app_version=query.get("app_version"),
            platform=query.get("platform"),
            device_id=query.get("device_id"),
        )

    def render(self, found: Resolved) -> bytes:
        return self.cache.code_push_answer_for(found.state, found.current, found.device)


# The documented route: same answers, for OpenAPI and any request the endpoint passes on.

router = APIRouter(tags=["sdk"])


class CodePushBundleOut(BaseModel):
    bundle_id: str = Field(description="The bundle's id (a UUID): a safe file name")
    version: int
    download_url: str
    checksum: str = Field(description="`sha256:` + 64 hex digits of the zip")
    signature: str = Field(
        description="`hmac-sha256:` + hex HMAC-SHA-256 of `checksum` under the server's "
        "secret key; clients parse it but do not verify it"
    )
    size_bytes: int
    mandatory: bool


class CodePushOut(BaseModel):
    """One of `no_update`, `update_available` (with `bundle`) or `rollback` (with `revert_to`)."""

    status: str = Field(examples=["no_update", "update_available", "rollback"])
    bundle: CodePushBundleOut | None = None
    revert_to: int | None = Field(
        default=None,
        description="The version to go back to; 0 means the app's built-in assets",
    )


@router.get(
    CODE_PUSH_PATH,
    response_model=CodePushOut,
    response_model_exclude_none=True,
    responses={
        400: {"model": ErrorOut},
        401: {"model": ErrorOut},
        429: RATE_LIMITED_RESPONSE,
        503: {"model": ErrorOut},
    },
    summary="Code-push check (current Flutter and React Native SDKs)",
)
async def code_push_check(
    request: Request,
    context: ContextDep,
    api_key: Annotated[str | None, Depends(api_key_header)],
    channel: Annotated[str | None, Query(description="Defaults to stable")] = None,
    current_bundle: Annotated[
        str | None, Query(description="The bundle version the device runs; 0 = none")
    ] = None,
    app_version: Annotated[
        str | None,
        Query(
            description="The app's version without build number: 2.4.1 (a label after it, as "
            "in 2.4.1-staging, is not compared)"
        ),
    ] = None,
    platform: Annotated[str | None, Query(description="ios or android")] = None,
    device_id: Annotated[
        str | None, Query(description="A stable id of the device, for percentage rollouts")
    ] = None,
) -> Response:
    # The key and the query parameters above are read by the endpoint from the request.
    return await documented_answer(request.app.code_push_endpoint, context, request)
