"""`GET /v1/downloads/...`: bundle files served by this server on the embedded default."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response

from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.deps import AppContext, ContextDep
from koolbase_ota.errors import Forbidden, NotFound
from koolbase_ota.storage import ObjectNotFound
from koolbase_ota.storage.local import LocalStore
from koolbase_ota.storage.signing import DOWNLOAD_PREFIX, verify

router = APIRouter(tags=["sdk"])

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
    },
    summary="Download a bundle through a signed URL (embedded default only)",
)
async def download(key: str, request: Request, context: ContextDep) -> Response:
    plan = await plan_download(
        context,
        key,
        request.query_params.multi_items(),
        range_header=request.headers.get("range"),
        if_range="if-range" in request.headers,
    )
    if plan.span is not None and request.method == "GET":
        return await _partial(plan)
    # Whole files go out through the server's `http.response.pathsend` where it has it
    # (granian does): the bytes never pass through Python.
    return FileResponse(
        plan.path, media_type="application/zip", headers=plan.headers, stat_result=plan.stat
    )


@dataclass(frozen=True)
class Plan:
    """What a valid download request gets: the file, and the one range to send, if any."""

    path: Path
    stat: os.stat_result
    headers: dict[str, str]
    #: (start, end exclusive) of a simple single range, served by us; None: the whole file,
    #: or a Range header that Starlette's FileResponse answers (see `_single_range`).
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
    checksum = await context.check_cache.checksum_of(key)
    try:
        path = store.path_for(key)
        stat = os.stat(path)
    except (ObjectNotFound, FileNotFoundError, NotADirectoryError):
        stat = None
    if checksum is None or stat is None:
        raise NotFound("bundle not found", code="bundle_not_found")
    etag = '"' + checksum.removeprefix("sha256:") + '"'
    span = None if if_range else _single_range(range_header, stat.st_size)
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
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _single_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a simple, satisfiable one-part range we serve ourselves.

    Anything else (several parts, If-Range, unsatisfiable or odd ranges) is left to Starlette's
    FileResponse, which implements the whole of RFC 9110 for it.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    elif last:
        start, end = max(size - int(last), 0), size
    else:
        return None
    if start >= end or start >= size or end - start > _ONE_READ:
        return None
    return start, end


async def _partial(plan: Plan) -> Response:
    assert plan.span is not None
    start, end = plan.span

    def read() -> bytes:
        with open(plan.path, "rb") as handle:
            return os.pread(handle.fileno(), end - start, start)

    body = await anyio.to_thread.run_sync(read)
    return Response(
        body,
        status_code=206,
        media_type="application/zip",
        headers={**plan.headers, **range_headers(start, start + len(body), plan.stat.st_size)},
    )


def range_headers(start: int, end: int, size: int) -> dict[str, str]:
    return {"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end - 1}/{size}"}


router.add_api_route(
    DOWNLOAD_PREFIX + "{key:path}", download, methods=["HEAD"], include_in_schema=False
)
