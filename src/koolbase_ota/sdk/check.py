"""`GET /v1/sdk/ota/check`: the hot path every installed app calls at launch.

`answer()` holds the logic. `CheckEndpoint` serves it as a bare ASGI callable in front of the
framework, so a warm check costs a few dict lookups and one `send`; the FastAPI route below
serves the same answers and documents the endpoint in OpenAPI.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import APIKeyHeader
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Scope, Send

from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.deps import ContextDep
from koolbase_ota.ratelimit import RateLimits
from koolbase_ota.sdk.cache import CHECK_ROUTE, CheckCache
from koolbase_ota.security import RATE_LIMITED_RESPONSE

CHECK_PATH = CHECK_ROUTE
DEFAULT_CHANNEL = "production"
_MAX_VERSION_DIGITS = 18
_MAX_CHANNEL = 50


def _error(message: str, code: str) -> bytes:
    return json.dumps({"error": message, "code": code}).encode()


_UNAVAILABLE = _error("the database is unavailable; try again", "database_unavailable")
_ERRORS = {
    "missing_api_key": (401, _error("missing x-api-key header", "missing_api_key")),
    "invalid_api_key": (401, _error("invalid API key", "invalid_api_key")),
    "invalid_version": (400, _error("version must be a non-negative integer", "invalid_version")),
    "invalid_channel": (400, _error("unknown channel", "invalid_channel")),
}
_RATE_LIMITED = _error("too many requests; retry later", "rate_limited")


_MISSING: Any = object()


async def answer(
    cache: CheckCache, *, api_key: str | None, channel: str | None, version: str | None
) -> tuple[int, bytes, bool, str | None]:
    """Status, JSON body, whether the cache had it all, and the error code if one."""
    if not api_key:
        return _fail("missing_api_key", hit=True)
    # The dict reads inline are the whole of a warm check; only a miss awaits the database.
    hit = True
    project_id = cache.keys.get(api_key, _MISSING)
    if project_id is _MISSING:
        project_id, hit = await cache.project_for_key(api_key)
    if project_id is None:
        return _fail("invalid_api_key", hit=hit)
    if version is None:
        current = 0
    elif version.isascii() and version.isdigit() and len(version) <= _MAX_VERSION_DIGITS:
        current = int(version)
    else:
        return _fail("invalid_version", hit=hit)
    name = channel or DEFAULT_CHANNEL
    if len(name) > _MAX_CHANNEL:
        return _fail("invalid_channel", hit=hit)
    state = cache.channels.get((project_id, name), _MISSING)
    if state is _MISSING:
        state, channel_hit = await cache.channel(project_id, name)
        hit = hit and channel_hit
    if state is None:
        return _fail("invalid_channel", hit=hit)
    return 200, cache.answer_for(state, current), hit, None


def _fail(code: str, *, hit: bool) -> tuple[int, bytes, bool, str]:
    status, body = _ERRORS[code]
    return status, body, hit, code


# The bare ASGI endpoint

_JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


def parse_query(raw: bytes) -> dict[str, str]:
    """`a=1&b=2` into a dict; the last of repeated names wins, as in Starlette."""
    params: dict[str, str] = {}
    if raw:
        text = raw.decode("latin-1")
        escaped = "%" in text or "+" in text
        for pair in text.split("&"):
            name, _, value = pair.partition("=")
            if escaped:
                name = unquote_plus(name, errors="replace")
                value = unquote_plus(value, errors="replace")
            params[name] = value
    return params


def is_check(scope: Scope) -> bool:
    return bool(
        scope["type"] == "http" and scope["path"] == CHECK_PATH and scope["method"] == "GET"
    )


class CheckEndpoint:
    """Answers a GET of CHECK_PATH without the framework: no routing, no dependencies."""

    def __init__(
        self,
        cache: CheckCache,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        limits: RateLimits | None = None,
    ) -> None:
        self.cache = cache
        self.headers = _JSON_HEADERS + (extra_headers or [])
        # No limit configured: not even the call, the check is the hot path.
        self.limits = limits if limits is not None and limits.limits_checks else None

    async def __call__(self, scope: Scope, send: Send) -> None:
        started = time.perf_counter()
        api_key = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                api_key = value.decode("latin-1")
        headers = self.headers
        error: str | None
        # Before anything else, so a flood of invented keys never reaches the database.
        retry_after = (
            None
            if self.limits is None
            else self.limits.check(api_key, self.limits.client_address(scope))
        )
        if retry_after is not None:
            status, body, hit, error = 429, _RATE_LIMITED, True, "rate_limited"
            headers = [*headers, (b"retry-after", str(retry_after).encode())]
        else:
            query = parse_query(scope["query_string"])
            try:
                status, body, hit, error = await answer(
                    self.cache,
                    api_key=api_key,
                    channel=query.get("channel"),
                    version=query.get("version"),
                )
            except Exception:
                # A cold entry and a database that is down: the one case with no answer to give.
                status, body, hit, error = 503, _UNAVAILABLE, False, "database_unavailable"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        self.cache.tally.record(status, time.perf_counter() - started, hit=hit, error=error)


# The documented route: same answers, for OpenAPI and any request the endpoint passes on.

router = APIRouter(tags=["sdk"])
_api_key = APIKeyHeader(
    name="x-api-key", auto_error=False, description="An environment's public key: `pk_live_...`"
)


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
    CHECK_PATH,
    response_model=CheckOut,
    responses={
        400: {"model": ErrorOut},
        401: {"model": ErrorOut},
        429: RATE_LIMITED_RESPONSE,
        503: {"model": ErrorOut},
    },
    summary="Check for a newer active bundle; returns a download URL if there is one",
)
async def check(
    request: Request,
    context: ContextDep,
    api_key: Annotated[str | None, Depends(_api_key)],
    channel: Annotated[str | None, Query(description="Defaults to production")] = None,
    version: Annotated[
        str | None, Query(description="The version the device has; 0 = none")
    ] = None,
) -> Response:
    limits = context.limits
    retry_after = limits.check(api_key, limits.client_address(request.scope))
    if retry_after is not None:
        return Response(
            _RATE_LIMITED,
            status_code=429,
            media_type="application/json",
            headers={"Cache-Control": "no-store", "Retry-After": str(retry_after)},
        )
    status, body, _hit, _error_code = await answer(
        context.check_cache, api_key=api_key, channel=channel, version=version
    )
    return Response(
        body,
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
