"""Dashboard routes for bundles; each parses, calls one service function, shapes the answer."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from koolbase_ota.bundles import service
from koolbase_ota.bundles.multipart import check_declared_length, read_upload_form
from koolbase_ota.bundles.schemas import BundleOut, ErrorOut, MandatoryIn
from koolbase_ota.deps import ContextDep, ProjectDep, parse_id
from koolbase_ota.errors import InvalidInput
from koolbase_ota.metrics import UPLOAD_BYTES, UPLOADS

router = APIRouter(prefix="/v1/projects/{project_id}/ota", tags=["bundles"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut} for status in (400, 401, 404)
}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["bundle"],
                    "properties": {
                        "bundle": {"type": "string", "format": "binary"},
                        "channel": {
                            "type": "string",
                            "enum": ["production", "staging", "development"],
                            "default": "production",
                        },
                        "mandatory": {"type": "string", "default": "false"},
                        "release_notes": {"type": "string", "maxLength": 10000},
                    },
                }
            }
        },
    }
}


@router.post(
    "/upload",
    status_code=201,
    response_model=BundleOut,
    responses={
        **_ERRORS,
        413: {"model": ErrorOut},
        415: {"model": ErrorOut},
        422: {"model": ErrorOut},
    },
    openapi_extra=_UPLOAD_BODY,
    summary="Upload a new bundle (multipart/form-data)",
)
async def upload_bundle(request: Request, project_id: ProjectDep, context: ContextDep) -> BundleOut:
    settings = context.settings
    check_declared_length(
        request.headers.get("content-length"), max_bundle_bytes=settings.max_bundle_bytes
    )
    staged = await read_upload_form(
        request.stream(),
        content_type=request.headers.get("content-type"),
        max_bundle_bytes=settings.max_bundle_bytes,
        tmp_dir=settings.data_dir / "tmp",
    )
    try:
        bundle = await service.upload_bundle(
            db=context.db, store=context.store, project_id=project_id, staged=staged
        )
    except Exception:
        UPLOADS.labels("failed").inc()
        raise
    finally:
        staged.discard()
    UPLOADS.labels("stored").inc()
    UPLOAD_BYTES.inc(bundle.file_size)
    return BundleOut.of(bundle)


@router.get(
    "/bundles",
    response_model=list[BundleOut],
    responses=_ERRORS,
    summary="List all bundles for a project",
)
def list_bundles(project_id: ProjectDep, context: ContextDep) -> list[BundleOut]:
    return [
        BundleOut.of(bundle) for bundle in service.list_bundles(context.db, project_id=project_id)
    ]


@router.post(
    "/bundles/{bundle_id}/activate",
    response_model=BundleOut,
    responses=_ERRORS,
    summary="Activate a bundle (makes it the active version for its channel)",
)
def activate_bundle(bundle_id: str, project_id: ProjectDep, context: ContextDep) -> BundleOut:
    bundle = service.activate_bundle(
        context.db, project_id=project_id, bundle_id=parse_id(bundle_id, what="bundle")
    )
    return BundleOut.of(bundle)


@router.patch(
    "/bundles/{bundle_id}",
    response_model=BundleOut,
    responses=_ERRORS,
    summary="Set or toggle the mandatory flag on a bundle",
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": MandatoryIn.model_json_schema()}},
        }
    },
)
async def set_mandatory(
    bundle_id: str, request: Request, project_id: ProjectDep, context: ContextDep
) -> BundleOut:
    parsed_id = parse_id(bundle_id, what="bundle")
    mandatory = _mandatory_from(await request.body())
    bundle = await run_in_threadpool(
        service.set_mandatory,
        context.db,
        project_id=project_id,
        bundle_id=parsed_id,
        mandatory=mandatory,
    )
    return BundleOut.of(bundle)


def _mandatory_from(body: bytes) -> bool | None:
    """`{"mandatory": bool}` sets the flag; an empty body (or `{}`) toggles it."""
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("the body must be JSON", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidInput('the body must be {"mandatory": true|false}', code="invalid_body")
    unknown = set(data) - {"mandatory"}
    if unknown:
        raise InvalidInput(f"unknown fields: {', '.join(sorted(unknown))}", code="invalid_body")
    value = data.get("mandatory")
    if value is not None and not isinstance(value, bool):
        raise InvalidInput("mandatory must be true or false", code="invalid_mandatory")
    return value


@router.delete(
    "/bundles/{bundle_id}",
    status_code=204,
    response_class=Response,
    responses=_ERRORS,
    summary="Delete a bundle and remove it from storage",
)
async def delete_bundle(bundle_id: str, project_id: ProjectDep, context: ContextDep) -> Response:
    await service.delete_bundle(
        db=context.db,
        store=context.store,
        project_id=project_id,
        bundle_id=parse_id(bundle_id, what="bundle"),
    )
    return Response(status_code=204)
