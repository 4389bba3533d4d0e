"""Operations: `/healthz`, `/readyz`, Prometheus `/metrics`, and the middleware that counts."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from koolbase_ota.deps import ContextDep
from koolbase_ota.errors import OTAError
from koolbase_ota.metrics import LATENCY, REQUESTS

logger = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])
#: The methods counted under their own name; any other is "other". granian passes on whatever
#: token a client sends as the method, and each one made new series without end.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database and the object store are reachable",
    responses={503: {"description": "a backend is unreachable"}},
)
async def readyz(context: ContextDep) -> JSONResponse:
    checks: dict[str, str] = {}

    try:
        # On the checks' pool: dashboard requests holding every shared thread and connection
        # (writes waiting on a locked table) leave the checks served, and the process ready.
        await context.check_cache.ping()
        checks["database"] = "ok"
    except Exception:
        checks["database"] = "unavailable"
    try:
        await context.store.check()
        checks["storage"] = "ok"
    except OTAError:
        checks["storage"] = "unavailable"
    except Exception as exc:
        # A store client's error of a kind not expected (the stores wrap theirs): still a
        # backend that cannot be used, so 503 as for the database, never a 500.
        logger.warning("readiness: the store check failed: %s", type(exc).__name__)
        checks["storage"] = "unavailable"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


# HEAD as GET, without the body: monitors that probe with HEAD (some uptime services do by
# default) got 405 and reported the server down. Left out of the OpenAPI document.
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(context: ContextDep) -> Response:
    context.check_cache.flush_tallies()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several workers: add up what every process wrote to the shared directory.
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        data = generate_latest(registry)
    else:
        data = generate_latest()
    return Response(data, media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts every answer by method, route template (never the raw path) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            REQUESTS.labels(method, template, str(status)).inc()
            LATENCY.labels(method, template).observe(time.perf_counter() - started)
