"""`GET /v1/downloads/...`: bundle files served by this server on the embedded default."""

from __future__ import annotations

import os
import re

import anyio.to_thread
from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response

from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.deps import ContextDep
from koolbase_ota.errors import Forbidden, NotFound
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
    store = context.store
    if not isinstance(store, LocalStore):
        raise NotFound("bundles are downloaded from the object store", code="not_found")
    refusal = verify(
        context.settings.secret_key,
        DOWNLOAD_PREFIX + key,
        request.query_params.multi_items(),
    )
    if refusal is not None:
        raise Forbidden(_MESSAGES[refusal], code=refusal)
    checksum = await context.check_cache.checksum_of(key)
    path = store.path_for(key)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        stat = None
    if checksum is None or stat is None:
        raise NotFound("bundle not found", code="bundle_not_found")
    headers = {
        "ETag": '"' + checksum.removeprefix("sha256:") + '"',
        # The URL is signed and short-lived; a private cache may keep it, a shared one not.
        "Cache-Control": "private, max-age=300",
    }
    span = _single_range(request, stat.st_size, headers["ETag"])
    if span is not None and request.method == "GET":
        return await _partial(path, span, stat.st_size, headers)
    # Whole files go out through the server's `http.response.pathsend` where it has it
    # (granian does): the bytes never pass through Python.
    return FileResponse(path, media_type="application/zip", headers=headers, stat_result=stat)


#: Ranges up to this size are read in one call and sent in one message.
_ONE_READ = 8 * 1024 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _single_range(request: Request, size: int, etag: str) -> tuple[int, int] | None:
    """(start, end exclusive) of a simple, satisfiable one-part range we serve ourselves.

    Anything else (several parts, If-Range, unsatisfiable or odd ranges) is left to Starlette's
    FileResponse, which implements the whole of RFC 9110 for it.
    """
    header = request.headers.get("range")
    if header is None or "if-range" in request.headers:
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


async def _partial(
    path: os.PathLike[str], span: tuple[int, int], size: int, headers: dict[str, str]
) -> Response:
    start, end = span

    def read() -> bytes:
        with open(path, "rb") as handle:
            return os.pread(handle.fileno(), end - start, start)

    body = await anyio.to_thread.run_sync(read)
    return Response(
        body,
        status_code=206,
        media_type="application/zip",
        headers={
            **headers,
            "Accept-Ranges": "bytes",
            "Content-Range": f"bytes {start}-{start + len(body) - 1}/{size}",
        },
    )


router.add_api_route(
    DOWNLOAD_PREFIX + "{key:path}", download, methods=["HEAD"], include_in_schema=False
)
