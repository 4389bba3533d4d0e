"""`GET /v1/sdk/ota/check`: the hot path every installed app calls at launch.

`answer()` holds the logic. `CheckEndpoint` serves it as a bare ASGI callable in front of the
framework, so a warm check costs a few dict lookups and one `send`; the FastAPI route below
serves the same answers and documents the endpoint in OpenAPI.
"""

from __future__ import annotations

import json
import time
from typing import Annotated
from urllib.parse import unquote_plus

from fastapi import APIRouter, Depends, Query
from fastapi.security import APIKeyHeader
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Scope, Send

from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.deps import ContextDep
from koolbase_ota.metrics import CHECK_CACHE, ERRORS, LATENCY, REQUESTS
from koolbase_ota.sdk.cache import CheckCache

CHECK_PATH = "/v1/sdk/ota/check"
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


async def answer(
    cache: CheckCache, *, api_key: str | None, channel: str | None, version: str | None
) -> tuple[int, bytes, bool]:
    """Status and JSON body of the check for these inputs, and whether the cache had it all."""
    if not api_key:
        return _fail("missing_api_key")
    project_id, key_hit = await cache.project_for_key(api_key)
    if project_id is None:
        return (*_fail("invalid_api_key")[:2], key_hit)
    if version is None:
        current = 0
    elif version.isascii() and version.isdigit() and len(version) <= _MAX_VERSION_DIGITS:
        current = int(version)
    else:
        return _fail("invalid_version")
    name = channel or DEFAULT_CHANNEL
    if len(name) > _MAX_CHANNEL:
        return _fail("invalid_channel")
    state, channel_hit = await cache.channel(project_id, name)
    if state is None:
        return (*_fail("invalid_channel")[:2], key_hit and channel_hit)
    return 200, cache.answer_for(state, current), key_hit and channel_hit


def _fail(code: str) -> tuple[int, bytes, bool]:
    ERRORS.labels(code).inc()
    status, body = _ERRORS[code]
    return status, body, True


# The bare ASGI endpoint

_JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
_REQUESTS = {
    status: REQUESTS.labels("GET", CHECK_PATH, str(status)) for status in (200, 400, 401, 503)
}
_LATENCY = LATENCY.labels("GET", CHECK_PATH)
_CACHE_HIT = CHECK_CACHE.labels("hit")
_CACHE_MISS = CHECK_CACHE.labels("miss")


def parse_query(raw: bytes) -> dict[str, str]:
    """`a=1&b=2` into a dict; the last of repeated names wins, as in Starlette."""
    params: dict[str, str] = {}
    if raw:
        for pair in raw.decode("latin-1").split("&"):
            name, _, value = pair.partition("=")
            params[unquote_plus(name, errors="replace")] = unquote_plus(value, errors="replace")
    return params


def is_check(scope: Scope) -> bool:
    return bool(
        scope["type"] == "http" and scope["path"] == CHECK_PATH and scope["method"] == "GET"
    )


class CheckEndpoint:
    """Answers a GET of CHECK_PATH without the framework: no routing, no dependencies."""

    def __init__(
        self, cache: CheckCache, extra_headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.cache = cache
        self.headers = _JSON_HEADERS + (extra_headers or [])

    async def __call__(self, scope: Scope, send: Send) -> None:
        started = time.perf_counter()
        api_key = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                api_key = value.decode("latin-1")
        query = parse_query(scope["query_string"])
        try:
            status, body, hit = await answer(
                self.cache,
                api_key=api_key,
                channel=query.get("channel"),
                version=query.get("version"),
            )
        except Exception:
            # A cold entry and a database that is down: the one case with no answer to give.
            status, hit = 503, False
            body = _UNAVAILABLE
            ERRORS.labels("database_unavailable").inc()
        (_CACHE_HIT if hit else _CACHE_MISS).inc()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*self.headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        _REQUESTS[status].inc()
        _LATENCY.observe(time.perf_counter() - started)


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
    responses={400: {"model": ErrorOut}, 401: {"model": ErrorOut}, 503: {"model": ErrorOut}},
    summary="Check for a newer active bundle; returns a download URL if there is one",
)
async def check(
    context: ContextDep,
    api_key: Annotated[str | None, Depends(_api_key)],
    channel: Annotated[str | None, Query(description="Defaults to production")] = None,
    version: Annotated[
        str | None, Query(description="The version the device has; 0 = none")
    ] = None,
) -> Response:
    status, body, _hit = await answer(
        context.check_cache, api_key=api_key, channel=channel, version=version
    )
    return Response(
        body,
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
