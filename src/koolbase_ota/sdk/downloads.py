"""`GET /v1/downloads/...`: bundle files served by this server on the embedded default."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import anyio.to_thread
from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response
from starlette.types import Message, Receive, Scope, Send

from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.deps import AppContext, ContextDep
from koolbase_ota.errors import DatabaseUnavailable, Forbidden, NotFound, RangeNotSatisfiable
from koolbase_ota.metrics import RECEIVED
from koolbase_ota.sdk.cache import CheckCache
from koolbase_ota.security import check_headers
from koolbase_ota.storage import ObjectNotFound
from koolbase_ota.storage.local import LocalStore
from koolbase_ota.storage.signing import DOWNLOAD_PREFIX, verify

router = APIRouter(tags=["sdk"])

_SECURITY_HEADERS = [(name.decode(), value.decode()) for name, value in check_headers()]

#: The scope's entry holding a refusal `served_plan` found, for the route to raise.
REFUSAL = "koolbase_ota.download_refusal"

_MESSAGES = {
    "invalid_signature": "invalid download URL signature",
    "url_expired": "download URL expired",
}


@router.get(
    DOWNLOAD_PREFIX + "{key:path}",
    operation_id="download_bundle",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/zip": {}}},
        206: {"content": {"application/zip": {}}},
        403: {"model": ErrorOut},
        404: {"model": ErrorOut},
        416: {"model": ErrorOut},
    },
    summary="Download a bundle through a signed URL (embedded default only)",
)
async def download(key: str, request: Request, context: ContextDep) -> Response:
    refusal = request.scope.get(REFUSAL)
    if refusal is not None:
        raise refusal  # found in front of the framework (`served_plan`): not looked up again
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    plan = await plan_download(
        context,
        key,
        request.query_params.multi_items(),
        range_header=range_header,
        if_range=if_range is not None,
    )
    if plan.other_range:
        ranges = requested_ranges(range_header, if_range, plan)
        if ranges == []:
            raise RangeNotSatisfiable(
                "range not satisfiable",
                headers={"Content-Range": f"bytes */{plan.stat.st_size}"},
            )
        span = _one_small_range(ranges)
        if span is None:
            return _FileAnswer(plan, ranges)
        plan = dataclasses.replace(plan, span=span, other_range=False)
    if plan.span is not None:
        if request.method == "GET":
            return await _partial(plan)
        return _FileAnswer(plan, [plan.span])  # HEAD: the range's headers, no body
    return _FileAnswer(plan, None)


class _FileAnswer(FileResponse):
    """The whole file, or the `ranges` already checked (`requested_ranges`), whatever the
    request's own Range and If-Range say: Starlette reads those again, and answers what it
    does not take with a plain-text 400 or 416. Whole files go out through the server's
    `http.response.pathsend` where it has it (granian does): the bytes never pass through
    Python."""

    def __init__(self, plan: Plan, ranges: list[tuple[int, int]] | None) -> None:
        super().__init__(
            plan.path, media_type="application/zip", headers=plan.headers, stat_result=plan.stat
        )
        self.ranges = ranges

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(n, v) for n, v in scope["headers"] if n not in (b"range", b"if-range")]
        if self.ranges is not None:
            spec = ",".join(f"{start}-{end - 1}" for start, end in self.ranges)
            headers.append((b"range", b"bytes=" + spec.encode()))
        await super().__call__({**scope, "headers": headers}, receive, send)


#: One part of a byte range set (RFC 9110 14.1.1): `first-last`, `first-` or `-suffix`.
_RANGE_SPEC = re.compile(r"(\d+)-(\d*)|-(\d+)")
#: More parts than this and the Range header is ignored (Starlette's bound).
_MAX_RANGES = 100


def requested_ranges(
    header: str | None, if_range: str | None, plan: Plan
) -> list[tuple[int, int]] | None:
    """The satisfiable parts of a Range header as (start, end exclusive), as RFC 9110 reads
    it: None to send the whole file (no Range, another unit than bytes, an If-Range that does
    not match, or too many parts), [] for 416 (an invalid range set, or no part within the
    file)."""
    if header is None:
        return None
    if if_range is not None and (
        if_range.startswith("W/")
        or if_range not in (plan.headers["ETag"], _http_date(plan.stat.st_mtime))
    ):
        return None
    return _byte_ranges(header, plan.stat.st_size)


def _byte_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """`requested_ranges` without If-Range: the one reading of a Range header, for the route
    and for the single ranges every interface sends itself (`plan_download`)."""
    unit, equals, spec = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    parts = [part.strip() for part in spec.split(",")]
    if len(parts) > _MAX_RANGES:
        return None
    ranges: list[tuple[int, int]] = []
    for part in filter(None, parts):
        match = _RANGE_SPEC.fullmatch(part)
        if match is None:
            return []
        first, last, suffix = match.groups()
        if first is not None:
            start = int(first)
            if last and int(last) < start:
                return []
            end = min(int(last) + 1, size) if last else size
        else:
            start, end = max(size - int(suffix), 0), size
        if start < end:
            ranges.append((start, end))
    return ranges


@dataclass(frozen=True)
class Plan:
    """What a valid download request gets: the file, and the one range to send, if any."""

    path: Path
    stat: os.stat_result
    headers: dict[str, str]
    #: (start, end exclusive) of a simple single range, served by us; None: the whole file,
    #: or a Range header that Starlette's FileResponse answers (see `_one_small_range`).
    span: tuple[int, int] | None
    #: A Range header was sent that `span` does not cover.
    other_range: bool


async def plan_download(
    context: AppContext,
    key: str,
    query: list[tuple[str, str]],
    *,
    range_header: str | None,
    if_range: bool,
) -> Plan:
    """Checks the signature and that the bundle still exists; raises the refusal otherwise."""
    store = context.store
    if not isinstance(store, LocalStore):
        raise NotFound("bundles are downloaded from the object store", code="not_found")
    refusal = verify(context.settings.secret_key, DOWNLOAD_PREFIX + key, query)
    if refusal is not None:
        raise Forbidden(_MESSAGES[refusal], code=refusal)
    try:
        checksum = await context.check_cache.checksum_of(key)
    except TimeoutError:
        raise DatabaseUnavailable("the database is unavailable; try again") from None
    try:
        path = store.path_for(key)
        stat = os.stat(path)
    except (ObjectNotFound, FileNotFoundError, NotADirectoryError):
        stat = None
    if checksum is None or stat is None:
        raise NotFound("bundle not found", code="bundle_not_found")
    etag = '"' + checksum.removeprefix("sha256:") + '"'
    span = (
        None
        if if_range or range_header is None
        else _one_small_range(_byte_ranges(range_header, stat.st_size))
    )
    return Plan(
        path=path,
        stat=stat,
        headers={
            "ETag": etag,
            # The URL is signed and short-lived; a private cache may keep it, a shared one not.
            "Cache-Control": "private, max-age=300",
        },
        span=span,
        other_range=range_header is not None and span is None,
    )


#: Ranges up to this size are read in one call and sent in one message.
_ONE_READ = 8 * 1024 * 1024


def _one_small_range(ranges: list[tuple[int, int]] | None) -> tuple[int, int] | None:
    """The one range of `ranges` if it is alone and small enough to read at once: what every
    interface sends itself. Anything else (several parts, unsatisfiable or larger ranges) is
    answered through Starlette's FileResponse."""
    if not ranges or len(ranges) > 1 or ranges[0][1] - ranges[0][0] > _ONE_READ:
        return None
    return ranges[0]


async def _partial(plan: Plan) -> Response:
    assert plan.span is not None
    start, end = plan.span
    headers = {
        **plan.headers,
        "Last-Modified": _http_date(plan.stat.st_mtime),
        **range_headers(start, end, plan.stat.st_size),
    }
    return _RangeResponse(plan.path, start, end, headers)


class _RangeResponse(Response):
    """One range of a file: sent by the server with sendfile(2) where it offers ASGI's
    `http.response.zerocopysend` (`koolbase_ota.httpserver` does), else read in one call."""

    def __init__(self, path: Path, start: int, end: int, headers: dict[str, str]) -> None:
        super().__init__(status_code=206, media_type="application/zip", headers=headers)
        self.path, self.start, self.end = path, start, end
        self.headers["content-length"] = str(end - start)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message = {"type": "http.response.start", "status": 206, "headers": self.raw_headers}
        if "http.response.zerocopysend" in scope.get("extensions", {}):
            await _send_zero_copy(send, start, self.path, self.start, self.end)
            return

        def read() -> bytes:
            with open(self.path, "rb") as handle:
                return os.pread(handle.fileno(), self.end - self.start, self.start)

        body = await anyio.to_thread.run_sync(read)
        await send(start)
        await send({"type": "http.response.body", "body": body})


@functools.lru_cache(maxsize=1024)
def _http_date(mtime: float) -> str:
    return formatdate(mtime, usegmt=True)


def answer_headers(plan: Plan) -> tuple[int, list[tuple[str, str]]]:
    """Status and headers of a planned download sent by the server itself (200 for the whole
    file, 206 for its one range), the same on every interface and as the route's."""
    headers = [
        ("content-type", "application/zip"),
        ("last-modified", _http_date(plan.stat.st_mtime)),
        *plan.headers.items(),
        *_SECURITY_HEADERS,
    ]
    if plan.span is None:
        headers += [("accept-ranges", "bytes"), ("content-length", str(plan.stat.st_size))]
        return 200, headers
    start, end = plan.span
    headers += [*range_headers(start, end, plan.stat.st_size).items()]
    headers.append(("content-length", str(end - start)))
    return 206, headers


def count_download(cache: CheckCache, status: int, started: float) -> None:
    """The request metrics the route's middleware would have counted."""
    cache.download_tally.record(status, time.perf_counter() - started)


async def served_plan(
    context: AppContext,
    key: str,
    query_string: str,
    *,
    range_header: str | None,
    if_range: bool,
    origin: bool,
) -> Plan | Exception | None:
    """The plan of a download the server sends itself, in front of the framework; None leaves
    the request to the route. Several-part ranges, If-Range and CORS requests go there, and
    so do refusals (the exception returned): the route raises it, not looking the bundle up
    again, and renders it (its JSON errors, its 503 with the database down) the same on every
    interface. Looked up twice, a download waited for a database that does not answer twice."""
    if origin and context.settings.cors_origins.strip():
        return None
    try:
        plan = await plan_download(
            context,
            key,
            parse_qsl(query_string, keep_blank_values=True),
            range_header=range_header,
            if_range=if_range,
        )
    except Exception as refusal:
        return refusal
    return None if plan.other_range else plan


def left_to_app(refusal: Exception | None, started: float) -> dict[str, Any]:
    """What the ASGI scope of a download `served_plan` left to the app carries besides: when
    it arrived (for the metrics), and the refusal found, for the route to raise."""
    entries: dict[str, Any] = {RECEIVED: started}
    if refusal is not None:
        entries[REFUSAL] = refusal
    return entries


async def send_download(context: AppContext, scope: Scope, send: Send) -> bool:
    """Answers a valid signed download (`served_plan`), the file sent by the server with
    ASGI's `http.response.zerocopysend`; False leaves the request to the route."""
    started = time.perf_counter()
    range_header = None
    if_range = origin = False
    for name, value in scope["headers"]:
        if name == b"range":
            if range_header is None:  # the first, as the route reads it
                range_header = value.decode("latin-1")
        elif name == b"if-range":
            if_range = True
        elif name == b"origin":
            origin = True
    plan = await served_plan(
        context,
        scope["path"][len(DOWNLOAD_PREFIX) :],
        scope["query_string"].decode("latin-1"),
        range_header=range_header,
        if_range=if_range,
        origin=origin,
    )
    if not isinstance(plan, Plan):
        scope.update(left_to_app(plan, started))
        return False
    status, headers = answer_headers(plan)
    start, end = plan.span if plan.span is not None else (0, plan.stat.st_size)
    raw_headers = [(name.encode(), value.encode()) for name, value in headers]
    response: Message = {"type": "http.response.start", "status": status, "headers": raw_headers}
    await _send_zero_copy(send, response, plan.path, start, end)
    count_download(context.check_cache, status, started)
    return True


async def _send_zero_copy(send: Send, response: Message, path: Path, start: int, end: int) -> None:
    """`response` (the `http.response.start` message), then bytes `start` to `end` of the file
    at `path`, sent by the server (ASGI's `http.response.zerocopysend`)."""
    with open(path, "rb") as file:
        await send(response)
        await send(
            {
                "type": "http.response.zerocopysend",
                "file": file,
                "offset": start,
                "count": end - start,
            }
        )


def range_headers(start: int, end: int, size: int) -> dict[str, str]:
    return {"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end - 1}/{size}"}


router.add_api_route(
    DOWNLOAD_PREFIX + "{key:path}", download, methods=["HEAD"], include_in_schema=False
)
