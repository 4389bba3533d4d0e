"""Dashboard routes for bundles; each parses, calls one service function, shapes the answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import WithJsonSchema
from starlette.concurrency import run_in_threadpool

from koolbase_ota import paging
from koolbase_ota.bundles import service
from koolbase_ota.bundles.multipart import check_declared_length, read_upload_form
from koolbase_ota.bundles.schemas import ActivateIn, BundleOut, BundlePatchIn, ErrorOut
from koolbase_ota.bundles.targeting import parse_rollout_percentage
from koolbase_ota.deps import (
    ContextDep,
    DashboardDep,
    ProjectDep,
    json_object,
    link_next_page,
    page_headers,
    parse_id,
)
from koolbase_ota.errors import InvalidInput
from koolbase_ota.metrics import UPLOAD_BYTES, UPLOADS

router = APIRouter(prefix="/v1/projects/{project_id}/ota", tags=["bundles"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    **{status: {"model": ErrorOut} for status in (400, 401, 404)},
    503: {"model": ErrorOut, "description": "The database or the store is unavailable"},
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
                            "default": "production",
                            "description": "production, staging, development, or a channel "
                            "the project added",
                        },
                        "mandatory": {"type": "string", "default": "false"},
                        "release_notes": {"type": "string", "maxLength": 10000},
                        "platform": {
                            "type": "string",
                            "enum": ["ios", "android"],
                            "description": "Serve the bundle only to this platform; absent for all",
                        },
                        "min_app_version": {
                            "type": "string",
                            "example": "2.4.0",
                            "description": "Lowest app version served (dotted numeric, "
                            "inclusive); absent for no bound",
                        },
                        "max_app_version": {
                            "type": "string",
                            "example": "2.9.99",
                            "description": "Highest app version served (inclusive)",
                        },
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
        408: {
            "model": ErrorOut,
            "description": "The body stalled for longer than the upload idle timeout",
        },
        413: {"model": ErrorOut},
        415: {"model": ErrorOut},
        422: {"model": ErrorOut},
    },
    openapi_extra=_UPLOAD_BODY,
    summary="Upload a new bundle (multipart/form-data)",
)
async def upload_bundle(
    request: Request, dashboard: DashboardDep, context: ContextDep
) -> BundleOut:
    settings = context.settings
    check_declared_length(
        request.headers.get("content-length"), max_bundle_bytes=settings.max_bundle_bytes
    )
    staged = await read_upload_form(
        request.stream(),
        content_type=request.headers.get("content-type"),
        max_bundle_bytes=settings.max_bundle_bytes,
        tmp_dir=settings.data_dir / "tmp",
        idle_timeout_seconds=settings.upload_idle_timeout_seconds,
        total_timeout_seconds=settings.upload_timeout_seconds,
        durable=context.store.keeps_spooled_file,
    )
    try:
        bundle = await service.upload_bundle(
            db=context.db,
            store=context.store,
            project_id=dashboard.project_id,
            staged=staged,
            actor=dashboard.actor,
        )
    except Exception:
        UPLOADS.labels("failed").inc()
        raise
    finally:
        staged.discard()
    UPLOADS.labels("stored").inc()
    UPLOAD_BYTES.inc(bundle.file_size)
    return BundleOut.of(bundle)


# Documented as the integer it must be, but parsed by the route so that a bad value gets our
# own 400 `invalid_limit` rather than the generic validation error.
_LimitText = Annotated[
    str, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": service.MAX_PAGE_SIZE})
]


@router.get(
    "/bundles",
    response_model=list[BundleOut],
    responses={
        **_ERRORS,
        200: {
            "description": "The bundles, by channel, newest version first: all of them, or one "
            "page when `limit` or `cursor` is given.",
            "headers": page_headers("more bundles"),
        },
    },
    summary="List all bundles for a project",
)
def list_bundles(
    request: Request,
    response: Response,
    project_id: ProjectDep,
    context: ContextDep,
    limit: Annotated[
        _LimitText | None,
        Query(
            description="Optional pagination: answer at most this many bundles (1 to "
            f"{service.MAX_PAGE_SIZE}). Without `limit` and `cursor` the whole list is answered.",
        ),
    ] = None,
    cursor: Annotated[
        str | None,
        Query(
            description="The `X-Next-Cursor` of the previous page; opaque. Empty means the "
            f"first page. Alone, it pages by {service.DEFAULT_PAGE_SIZE}.",
        ),
    ] = None,
) -> list[BundleOut]:
    if limit is None and cursor is None:
        bundles = service.list_bundles(context.db, project_id=project_id)
        return [BundleOut.of(bundle) for bundle in bundles]
    size = paging.parse_limit(
        limit, default=service.DEFAULT_PAGE_SIZE, maximum=service.MAX_PAGE_SIZE
    )
    page = service.list_bundle_page(context.db, project_id=project_id, limit=size, cursor=cursor)
    link_next_page(
        request,
        response,
        public_url=context.settings.public_url,
        limit=size,
        cursor=page.next_cursor,
    )
    return [BundleOut.of(bundle) for bundle in page.bundles]


@router.post(
    "/bundles/{bundle_id}/activate",
    response_model=BundleOut,
    responses={**_ERRORS, 409: {"model": ErrorOut}},
    summary="Activate a bundle (makes it the active version for its channel)",
    description="Makes the bundle its channel's head: the release the checks start from. "
    'An optional JSON body `{"rollout_percentage": 10}` releases it to that share of devices '
    "(1-100; the others keep getting the previous matching release). Without a body it "
    "behaves as the seed API: activating the active bundle again changes nothing. A recalled "
    "bundle cannot be activated (409 `bundle_recalled`).",
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": ActivateIn.model_json_schema()}},
        }
    },
)
async def activate_bundle(
    bundle_id: str, request: Request, dashboard: DashboardDep, context: ContextDep
) -> BundleOut:
    parsed_id = parse_id(bundle_id, what="bundle")
    body = json_object(
        await request.body(),
        expected='{"rollout_percentage": 1-100}',
        fields=("rollout_percentage",),
        optional=True,
    )
    raw = body.get("rollout_percentage")
    bundle = await run_in_threadpool(
        service.activate_bundle,
        context.db,
        project_id=dashboard.project_id,
        bundle_id=parsed_id,
        rollout_percentage=None if raw is None else parse_rollout_percentage(raw),
        actor=dashboard.actor,
    )
    # This process's checks see the change at once; the others within their refresh interval.
    await context.show_change()
    return BundleOut.of(bundle)


@router.post(
    "/bundles/{bundle_id}/recall",
    response_model=BundleOut,
    responses=_ERRORS,
    summary="Recall a bundle: it is never served again, devices on it are sent back",
    description="Idempotent. When the bundle is its channel's head, the newest released, "
    "non-recalled bundle of a lower version becomes the head (none: the channel has no head). "
    "Devices that run the recalled version are offered the newest matching release older than "
    "it, or told to go back to the app's built-in assets.",
)
async def recall_bundle(bundle_id: str, dashboard: DashboardDep, context: ContextDep) -> BundleOut:
    bundle = await run_in_threadpool(
        service.recall_bundle,
        context.db,
        project_id=dashboard.project_id,
        bundle_id=parse_id(bundle_id, what="bundle"),
        actor=dashboard.actor,
    )
    await context.show_change()
    return BundleOut.of(bundle)


@router.patch(
    "/bundles/{bundle_id}",
    response_model=BundleOut,
    responses=_ERRORS,
    summary="Set or toggle the mandatory flag; change a bundle's targeting and rollout",
    description='`{"mandatory": true|false}` sets the flag and an empty body (or `{}`) toggles '
    "it, as in the seed API. `platform`, `min_app_version`, `max_app_version` (null clears "
    "one) and `rollout_percentage` change who the bundle reaches; a body with only those "
    "leaves the mandatory flag alone, and beside them `mandatory` must be true or false.",
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": BundlePatchIn.model_json_schema()}},
        }
    },
)
async def set_mandatory(
    bundle_id: str, request: Request, dashboard: DashboardDep, context: ContextDep
) -> BundleOut:
    parsed_id = parse_id(bundle_id, what="bundle")
    body = json_object(
        await request.body(),
        expected='{"mandatory": true|false, ...}',
        fields=None,  # service.update_bundle names the unknown ones
        optional=True,
    )
    if set(body) <= {"mandatory"}:
        # The seed's PATCH: set the flag, or toggle it with no value.
        mandatory = body.get("mandatory")
        if mandatory is not None and not isinstance(mandatory, bool):
            raise InvalidInput("mandatory must be true or false", code="invalid_mandatory")
        bundle = await run_in_threadpool(
            service.set_mandatory,
            context.db,
            project_id=dashboard.project_id,
            bundle_id=parsed_id,
            mandatory=mandatory,
            actor=dashboard.actor,
        )
    else:
        bundle = await run_in_threadpool(
            service.update_bundle,
            context.db,
            project_id=dashboard.project_id,
            bundle_id=parsed_id,
            fields=body,
            actor=dashboard.actor,
        )
    await context.show_change()
    return BundleOut.of(bundle)


@router.delete(
    "/bundles/{bundle_id}",
    status_code=204,
    response_class=Response,
    responses=_ERRORS,
    summary="Delete a bundle and remove it from storage",
)
async def delete_bundle(bundle_id: str, dashboard: DashboardDep, context: ContextDep) -> Response:
    await service.delete_bundle(
        db=context.db,
        store=context.store,
        project_id=dashboard.project_id,
        bundle_id=parse_id(bundle_id, what="bundle"),
        actor=dashboard.actor,
    )
    await context.show_change()
    return Response(status_code=204)
