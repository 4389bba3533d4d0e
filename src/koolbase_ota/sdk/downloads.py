"""`GET /v1/downloads/...`: bundle files served by this server on the embedded default."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, Response

from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.deps import ContextDep
from koolbase_ota.errors import Forbidden, NotFound
from koolbase_ota.sdk import service
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
    bundle = await run_in_threadpool(service.bundle_for_download, context.db, storage_path=key)
    path = store.path_for(key)
    if bundle is None or not path.is_file():
        raise NotFound("bundle not found", code="bundle_not_found")
    return FileResponse(
        path,
        media_type="application/zip",
        headers={
            "ETag": '"' + bundle.checksum.removeprefix("sha256:") + '"',
            # The URL is signed and short-lived; a private cache may keep it, a shared one not.
            "Cache-Control": "private, max-age=300",
        },
    )


router.add_api_route(
    DOWNLOAD_PREFIX + "{key:path}", download, methods=["HEAD"], include_in_schema=False
)
