"""`GET /v1/sdk/ota/check`: the hot path every installed app calls at launch.

`CheckEndpoint` holds the logic and answers in front of the framework: as a bare ASGI callable,
on granian's RSGI interface, and (warm) inside `koolbase_ota.httpserver`'s parser callbacks.
The FastAPI route below documents the endpoint in OpenAPI and answers through the same endpoint.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import APIKeyHeader
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Scope, Send

from koolbase_ota.bundles import targeting
from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.deps import AppContext, ContextDep
from koolbase_ota.projects import channels
from koolbase_ota.projects.service import MAX_PUBLIC_KEY_LENGTH
from koolbase_ota.ratelimit import RateLimits
from koolbase_ota.sdk.cache import (
    ANSWER_REUSE_SECONDS,
    ANY_DEVICE,
    CHECK_ROUTE,
    ChannelState,
    CheckCache,
    Device,
)
from koolbase_ota.security import RATE_LIMITED_RESPONSE

CHECK_PATH = CHECK_ROUTE
DEFAULT_CHANNEL = "production"
_MAX_VERSION_DIGITS = 18
#: An `x-api-key` that granian could not give as text: no key is this, so it is refused as
#: invalid (and kept as unknown, like any other key that matches none).
UNREADABLE_KEY = "\ufffd"


def _error(message: str, code: str) -> bytes:
    return json.dumps({"error": message, "code": code}).encode()


_UNAVAILABLE = _error("the database is unavailable; try again", "database_unavailable")
_ERRORS = {
    "missing_api_key": (401, _error("missing x-api-key header", "missing_api_key")),
    "invalid_api_key": (401, _error("invalid API key", "invalid_api_key")),
    "invalid_version": (
        400,
        _error("version must be a non-negative integer of at most 18 digits", "invalid_version"),
    ),
    "invalid_channel": (400, _error("unknown channel", "invalid_channel")),
    "invalid_app_version": (
        400,
        _error(
            "app_version must start with a dotted numeric version like 2.4.1",
            "invalid_app_version",
        ),
    ),
    "invalid_platform": (
        400,
        _error("platform must be up to 32 letters, digits, '.', '_' or '-'", "invalid_platform"),
    ),
    "invalid_device_id": (
        400,
        _error(
            "device_id must be up to 128 letters, digits, '.', '_', ':' or '-'",
            "invalid_device_id",
        ),
    ),
    "invalid_current_bundle": (
        400,
        _error(
            "current_bundle must be a non-negative integer of at most 18 digits",
            "invalid_current_bundle",
        ),
    ),
}
_RATE_LIMITED = _error("too many requests; retry later", "rate_limited")

#: A check's status, body, cache hit and error code.
Answer = tuple[int, bytes, bool, str | None]
#: The same and the 429's `Retry-After` (or None).
Outcome = tuple[int, bytes, bool, str | None, int | None]
#: A kept answer (`CheckEndpoint.cached_outcome`): the cache generation it was worked out in,
#: the time it may be reused until, the channel's rollouts it depends on
#: (`ChannelState.rollouts`: empty when the answer is the same for any device, None when no
#: other device may reuse it) and the answers by rollout cohort (0 for an exact request).
Reused = tuple[int, float, tuple[tuple[str, int], ...] | None, dict[int, Answer]]
#: Bounds of the reused answers (`CheckEndpoint.cached_outcome`): entries, and request size.
_MAX_REUSED = 10_000
_MAX_REUSED_REQUEST = 512
#: How a query names the device: `device_id=<id>`.
DEVICE_ID_FIELD = b"device_id="
_AMPERSAND = ord("&")


def without_device(raw_query: bytes | str) -> tuple[bytes, str] | None:
    """A raw query with exactly one `device_id`, plainly written: the query without it, and
    the id. None for any other (none, several, percent-encoded, a string query)."""
    if not isinstance(raw_query, bytes) or b"%" in raw_query or b"+" in raw_query:
        return None
    mentions = raw_query.count(b"device_id")
    if mentions != 1:
        return None if mentions == 0 else _without_device_parts(raw_query)
    # The one mention must begin a part and be a field: `device_id=`.
    at = raw_query.find(DEVICE_ID_FIELD)
    if at < 0 or (at > 0 and raw_query[at - 1] != _AMPERSAND):
        return None
    start = at + len(DEVICE_ID_FIELD)
    end = raw_query.find(b"&", at)
    if end < 0:  # the last part
        return raw_query[: max(at - 1, 0)], raw_query[start:].decode("latin-1")
    return raw_query[:at] + raw_query[end + 1 :], raw_query[start:end].decode("latin-1")


def _without_device_parts(raw_query: bytes) -> tuple[bytes, str] | None:
    """`without_device` for a query that mentions `device_id` more than once, part by part."""
    others = []
    device = None
    for part in raw_query.split(b"&"):
        if part.startswith(DEVICE_ID_FIELD):
            if device is not None:
                return None
            device = part[len(DEVICE_ID_FIELD) :]
        elif part == b"device_id":
            return None
        else:
            others.append(part)
    if device is None:
        return None
    return b"&".join(others), device.decode("latin-1")


#: Whitespace around a header's value, which is not the value's (RFC 9110 5.5): llhttp keeps
#: what trails it, granian does not, so the key is read without it on every interface.
_OWS = " \t"


def key_value(api_key: str | None) -> str | None:
    """An `x-api-key` header's value as the key it names, without surrounding whitespace."""
    return api_key.strip(_OWS) if api_key else api_key


def parse_device(
    app_version: str | None, platform: str | None, device_id: str | None
) -> Device | str:
    """What the device says about itself, or the error code of what it got wrong."""
    if not (app_version or platform or device_id):
        return ANY_DEVICE
    version_key = None
    if app_version:
        if len(app_version) > targeting.MAX_DEVICE_APP_VERSION_CHARS:
            # Refused before the kept parses: each keeps its text, and a request's can be as
            # long as its head (64 KiB), so 1,024 of them would hold 64 MiB per process.
            return "invalid_app_version"
        version_key = targeting.device_app_version(app_version)
        if version_key is None:
            return "invalid_app_version"
    if platform:
        if not targeting.valid_device_platform(platform):
            return "invalid_platform"
        platform = platform.lower()
    if device_id and not targeting.valid_device_id(device_id):
        return "invalid_device_id"
    return Device(platform=platform or None, app_version=version_key, device_id=device_id or None)


def parse_version(raw: str | None) -> int | None:
    """A device's bundle version: absent is 0; None when it is not a plain non-negative number."""
    if raw is None:
        return 0
    if raw.isascii() and raw.isdigit() and len(raw) <= _MAX_VERSION_DIGITS:
        return int(raw)
    return None


_MISSING: Any = object()


@dataclass(slots=True)
class CheckRequest:
    """What a check asks, as both checks name it: the key, the channel (its default
    applied), the device's bundle version (and the error code when it is not a number)."""

    api_key: str | None
    channel: str
    version: str | None
    version_error: str
    app_version: str | None
    platform: str | None
    device_id: str | None


@dataclass(slots=True)
class Resolved:
    """A check's request, understood: the channel's cached state and the device."""

    state: ChannelState
    current: int
    device: Device
    hit: bool


@dataclass(frozen=True)
class Miss:
    """What `resolve_cached` needs from the database first: the key's project (`project_id`
    None) or that project's channel."""

    project_id: uuid.UUID | None


def resolve_cached(
    cache: CheckCache, request: CheckRequest, loaded: dict[str, Any] | None = None
) -> Resolved | tuple[int, bytes, bool, str] | Miss:
    """The key's project and the channel's state, or the error answer, from the cache alone
    (and what the caller `loaded` for it); a `Miss` names the lookup it lacks. Shared by both
    checks; a warm check is this function and nothing else."""
    hit = not loaded
    api_key, channel = request.api_key, request.channel
    if not api_key:
        return _fail("missing_api_key", hit=hit)
    if len(api_key) > MAX_PUBLIC_KEY_LENGTH:
        # No key is this long: refused without a lookup, and not kept as unknown either (a
        # flood of long made-up keys would cost their length each, up to the map's bound).
        return _fail("invalid_api_key", hit=hit)
    project_id = cache.keys.get(api_key, _MISSING)
    if project_id is _MISSING:
        if loaded is None or "key" not in loaded:
            return Miss(None)
        project_id = loaded["key"]
    if project_id is None:
        return _fail("invalid_api_key", hit=hit)
    current = parse_version(request.version)
    if current is None:
        return _fail(request.version_error, hit=hit)
    device = parse_device(request.app_version, request.platform, request.device_id)
    if isinstance(device, str):
        return _fail(device, hit=hit)
    state = cache.channels.get((project_id, channel), _MISSING)
    if state is _MISSING:
        if not channels.NAME_RULE.fullmatch(channel):
            # No channel is named so: refused without a lookup, and not kept either (PostgreSQL
            # refuses a NUL in a query with an error, which was a 503).
            return _fail("invalid_channel", hit=hit)
        if loaded is None or "channel" not in loaded:
            return Miss(project_id)
        state = loaded["channel"]
    if state is None:
        return _fail("invalid_channel", hit=hit)
    return Resolved(state=state, current=current, device=device, hit=hit)


async def resolve(
    cache: CheckCache, request: CheckRequest
) -> Resolved | tuple[int, bytes, bool, str]:
    """`resolve_cached`, reading what the cache lacks from the database (in a worker thread)."""
    loaded: dict[str, Any] = {}
    while True:
        found = resolve_cached(cache, request, loaded)
        if not isinstance(found, Miss):
            return found
        if found.project_id is None:
            assert request.api_key  # resolve_cached answers a missing key itself
            loaded["key"] = await cache.project_for_key(request.api_key)
        else:
            loaded["channel"] = await cache.channel(found.project_id, request.channel)


def _fail(code: str, *, hit: bool) -> tuple[int, bytes, bool, str]:
    status, body = _ERRORS[code]
    return status, body, hit, code


# The bare ASGI endpoint

_JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


def parse_query(raw: bytes | str) -> dict[str, str]:
    """`a=1&b=2` into a dict; the last of repeated names wins, as in Starlette."""
    params: dict[str, str] = {}
    if raw:
        text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        escaped = "%" in text or "+" in text
        for pair in text.split("&"):
            name, _, value = pair.partition("=")
            if escaped:
                name = unquote_plus(name, errors="replace")
                value = unquote_plus(value, errors="replace")
            params[name] = value
    return params


def last_api_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The value of the last `x-api-key` header of an ASGI scope's `headers`, or None.

    The last, on every interface: as `koolbase_ota.httpserver` reads it on the warm path.
    (Starlette's `Headers.get`, and so FastAPI's `APIKeyHeader`, would take the first.)
    """
    api_key = None
    for name, value in headers:
        if name == b"x-api-key":
            api_key = value.decode("latin-1")
    return api_key


def is_check(scope: Scope) -> bool:
    return bool(
        scope["type"] == "http" and scope["path"] == CHECK_PATH and scope["method"] == "GET"
    )


class CheckEndpoint:
    """Answers a GET of CHECK_PATH without the framework: no routing, no dependencies."""

    path = CHECK_PATH

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
        #: (key, raw query, or the query without its device id) -> what is kept of its
        #: answer: see `cached_outcome`.
        self.answers: dict[tuple[str | None, bytes | str], Reused] = {}
        self.tally = cache.tally
        #: The same headers as RSGI wants them.
        self.text_headers = [(name.decode(), value.decode()) for name, value in self.headers]

    def request(self, api_key: str | None, query: dict[str, str]) -> CheckRequest:
        """What this check's query parameters ask."""
        return CheckRequest(
            api_key=key_value(api_key),
            channel=query.get("channel") or DEFAULT_CHANNEL,
            version=query.get("version"),
            version_error="invalid_version",
            app_version=query.get("app_version"),
            platform=query.get("platform"),
            device_id=query.get("device_id"),
        )

    def render(self, found: Resolved) -> bytes:
        return self.cache.answer_for(found.state, found.current, found.device)

    def _finish(
        self, found: Resolved | tuple[int, bytes, bool, str]
    ) -> tuple[int, bytes, bool, str | None]:
        if isinstance(found, tuple):
            return found
        return 200, self.render(found), found.hit, None

    async def respond(
        self, api_key: str | None, query: dict[str, str]
    ) -> tuple[int, bytes, bool, str | None]:
        return self._finish(await resolve(self.cache, self.request(api_key, query)))

    def _limited(self, api_key: str | None, address: Callable[[], str]) -> Outcome | None:
        if self.limits is not None:
            retry_after = self.limits.check(api_key, address())
            if retry_after is not None:
                return 429, _RATE_LIMITED, True, "rate_limited", retry_after
        return None

    async def outcome(
        self, api_key: str | None, address: Callable[[], str], raw_query: bytes | str
    ) -> Outcome:
        """Status, body, cache hit, error code and the 429's `Retry-After` (or None), for
        every interface. `address` gives the client's, read only when a limit applies."""
        cached = self.cached_outcome(api_key, address, raw_query)
        if cached is not None:
            return cached
        # Before any database work, so a flood of invented keys never reaches the database.
        limited = self._limited(api_key, address)
        if limited is not None:
            return limited
        try:
            # At most the database timeout, queueing for a lookup thread included: with the
            # database slow to answer (a locked table, a host that does not answer) the lookups
            # of other keys and channels ahead in the queue each took up to the timeout, and a
            # check waited for them in turn. Its lookup, once a thread has taken it, goes on
            # and fills the cache (see `CheckCache._abandon`).
            status, body, hit, error = await asyncio.wait_for(
                self.respond(api_key, parse_query(raw_query)), self.cache.answer_within_seconds
            )
        except Exception:
            # A cold entry and a database that is down: the one case with no answer to give.
            return 503, _UNAVAILABLE, False, "database_unavailable", None
        return status, body, hit, error, None

    def cached_outcome(
        self, api_key: str | None, address: Callable[[], str], raw_query: bytes | str
    ) -> Outcome | None:
        """`outcome` when the cache holds all it needs, with no await; None (and no token of
        the rate limit taken) when it does not, and `outcome` must answer.

        Devices of one app ask the same few questions (key, channel, version), so the finished
        answer to an identical request is reused for up to a second while nothing changed.
        Each device also sends its own `device_id`, which matters only to the releases rolled
        out to a share of devices, and only as whether each reaches it (its cohort): the
        answer is kept under the query without the id, per cohort, and every device with a
        valid id asking the rest of the question reuses its cohort's.
        """
        cache = self.cache
        now = time.monotonic()
        memo_key = (api_key, raw_query)
        reused = self.answers.get(memo_key)
        # A device whose answer its cohort shares, kept under the query without its valid id.
        device_id = None
        if reused is None:
            anonymous = without_device(raw_query)
            if anonymous is not None and targeting.valid_device_id(anonymous[1]):
                device_id = anonymous[1]
                memo_key = (api_key, anonymous[0])
                reused = self.answers.get(memo_key)
        answer = None
        if reused is not None and reused[0] == cache.generation and now < reused[1]:
            rollouts = reused[2]
            if device_id is None or rollouts == ():
                answer = reused[3].get(0)
            elif rollouts is not None:
                answer = reused[3].get(targeting.rollout_cohort(device_id, rollouts))
        if answer is None:
            found = resolve_cached(cache, self.request(api_key, parse_query(raw_query)))
            if isinstance(found, Miss):
                return None
            answer = self._finish(found)
            self._keep(memo_key, raw_query, found, device_id, answer, now)
        limited = self._limited(api_key, address)
        if limited is not None:
            return limited
        status, body, hit, error = answer
        return status, body, hit, error, None

    def _keep(
        self,
        memo_key: tuple[str | None, bytes | str],
        raw_query: bytes | str,
        found: Resolved | tuple[int, bytes, bool, str],
        device_id: str | None,
        answer: Answer,
        now: float,
    ) -> None:
        """Keep `answer` for `cached_outcome`: for the cohort of `device_id` (under the query
        without it), or for the exact request."""
        api_key = memo_key[0]
        if len(raw_query) + len(api_key or "") > _MAX_REUSED_REQUEST:
            return
        rollouts: tuple[tuple[str, int], ...] | None = ()
        cohort = 0
        if isinstance(found, Resolved) and found.device.device_id is None:
            # A request without a device id: cohort 0's answer, which devices may reuse.
            rollouts = found.state.rollouts
        elif isinstance(found, Resolved) and device_id is not None:
            rollouts = found.state.rollouts
            if rollouts is None:
                # Too many rollouts to work out a cohort on every check: kept per device.
                memo_key, rollouts = (api_key, raw_query), ()
            else:
                # Worked out again, against the rollouts of the state that gave this answer:
                # the device was looked up by the kept entry's, and a channel loaded again
                # since (its map emptied at its bound) may have others under one generation.
                cohort = targeting.rollout_cohort(device_id, rollouts)
        generation = self.cache.generation
        kept = self.answers.get(memo_key)
        if kept is not None and kept[0] == generation and now < kept[1] and kept[2] == rollouts:
            # Another cohort of a kept question: at most 2 ** MAX_SHARED_ROLLOUTS (16) of them.
            kept[3][cohort] = answer
            return
        if len(self.answers) >= _MAX_REUSED:
            self.answers.clear()
        until = now + ANSWER_REUSE_SECONDS
        self.answers[memo_key] = (generation, until, rollouts, {cohort: answer})

    async def __call__(self, scope: Scope, send: Send) -> None:
        started = time.perf_counter()
        api_key = last_api_key(scope["headers"])
        limits = self.limits
        status, body, hit, error, retry_after = await self.outcome(
            api_key,
            lambda: limits.client_address(scope) if limits is not None else "",
            scope["query_string"],
        )
        headers = self.headers
        if retry_after is not None:
            headers = [*headers, (b"retry-after", str(retry_after).encode())]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        self.tally.record(status, time.perf_counter() - started, hit=hit, error=error)

    async def rsgi(self, scope: Any, protocol: Any) -> None:
        """The same answers on granian's RSGI interface, with no ASGI scope or messages."""
        started = time.perf_counter()
        # The last, as on every other interface (granian's `get` gives the first).
        api_keys = scope.headers.get_all("x-api-key")
        if api_keys:
            api_key: str | None = api_keys[-1]
        elif "x-api-key" in scope.headers:
            # granian leaves out values that are not UTF-8, but not their name: a key was
            # sent, and no key matches it (`invalid_api_key`, as on the other interfaces).
            api_key = UNREADABLE_KEY
        else:
            api_key = None
        limits = self.limits
        status, body, hit, error, retry_after = await self.outcome(
            api_key,
            lambda: limits.rsgi_client_address(scope) if limits is not None else "",
            scope.query_string,
        )
        headers = self.text_headers
        if retry_after is not None:
            headers = [*headers, ("retry-after", str(retry_after))]
        protocol.response_bytes(status, [*headers, ("content-length", str(len(body)))], body)
        self.tally.record(status, time.perf_counter() - started, hit=hit, error=error)


# The documented route: same answers, for OpenAPI and any request the endpoint passes on.

router = APIRouter(tags=["sdk"])
api_key_header = APIKeyHeader(
    name="x-api-key", auto_error=False, description="An environment's public key: `pk_live_...`"
)


class CheckOut(BaseModel):
    """`{"has_update": false}`, or the offer with every other field.

    `rollback` is added (true) only when the device runs a recalled version and the offer is
    an older release.
    """

    has_update: bool
    version: int | None = None
    checksum: str | None = None
    mandatory: bool | None = None
    download_url: str | None = None
    release_notes: str | None = None
    file_size: int | None = None
    rollback: bool | None = None


async def documented_answer(
    endpoint: CheckEndpoint | None, context: AppContext, request: Request
) -> Response:
    """A documented check route's answer: the bare endpoint's, as it sends it. (The app
    answers these paths in front of the framework; the routes document them in OpenAPI.)
    The key is read as the endpoint reads it, not as the route's `APIKeyHeader` does."""
    if endpoint is None:
        raise RuntimeError("the check endpoints are made with the app")
    limits = context.limits
    status, body, _hit, _error, retry_after = await endpoint.outcome(
        last_api_key(request.scope["headers"]),
        lambda: limits.client_address(request.scope),
        request.scope["query_string"],
    )
    headers = {"Cache-Control": "no-store"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


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
    api_key: Annotated[str | None, Depends(api_key_header)],
    channel: Annotated[str | None, Query(description="Defaults to production")] = None,
    version: Annotated[
        str | None, Query(description="The version the device has; 0 = none")
    ] = None,
    app_version: Annotated[
        str | None,
        Query(
            description="Optional: the app's version (2.4.1; a label after it, as in "
            "2.4.1-staging, is not compared), for bundles targeting a range"
        ),
    ] = None,
    platform: Annotated[
        str | None,
        Query(description="Optional: ios or android, for bundles targeting a platform"),
    ] = None,
    device_id: Annotated[
        str | None,
        Query(
            description="Optional: a stable id of the device (up to 128 characters), for "
            "percentage rollouts; without it only bundles released to 100% are offered"
        ),
    ] = None,
) -> Response:
    # The key and the query parameters above are read by the endpoint from the request.
    return await documented_answer(request.app.check_endpoint, context, request)
