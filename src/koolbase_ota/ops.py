"""Operations: `/healthz`, `/readyz`, Prometheus `/metrics`, the middleware that counts, and
HEAD for every GET route."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from koolbase_ota.deps import ContextDep
from koolbase_ota.errors import OTAError
from koolbase_ota.metrics import LATENCY, RECEIVED, REQUESTS

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

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        #: The app's routes: an answer given before routing (a body over the limit) is still
        #: counted under the route its path names, not "unmatched" with unknown paths.
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = scope.get(RECEIVED) or time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            template = self._template(scope)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            REQUESTS.labels(method, template, str(status)).inc()
            LATENCY.labels(method, template).observe(time.perf_counter() - started)

    def _template(self, scope: Scope) -> str:
        route: Any = scope.get("route")
        if path := getattr(route, "path", None):
            return str(path)
        return _matching_path(self.routes, scope) or "unmatched"


def _matching_path(routes: list[BaseRoute], scope: Scope) -> str | None:
    """The template of the route `scope` goes to, looked for in routers FastAPI included too
    (an included router matches as a whole and does not say which of its routes did)."""
    for candidate in routes:
        if candidate.matches(scope)[0] is Match.NONE:
            continue
        included = getattr(candidate, "original_router", None)
        if included is not None:
            return _matching_path(included.routes, scope)
        return getattr(candidate, "path", None)
    return None


class HeadAsGetMiddleware:
    """HEAD of a route that has GET and no HEAD of its own is answered as that GET without its
    body: the same status and headers, `Content-Length` included (RFC 9110 9.3.2: every
    general-purpose server supports HEAD). FastAPI's routes have only the methods they name,
    so monitors that probe with HEAD (some uptime services do by default) got 405 from
    `/healthz`, the checks and every dashboard read. Downloads keep their own HEAD, which
    opens no file. Innermost, so the metrics count the request as HEAD, under its route.
    """

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        #: The app's routes, the same list the router reads: routes added later count too.
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or not self._get_only(scope):
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}

        async def send_head(message: Message) -> None:
            # The start as it is; of what follows (a body, or a file the server would send:
            # ASGI's zerocopysend and pathsend), only the end, empty.
            if message["type"] != "http.response.start":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        try:
            await self.app(as_get, receive, send_head)
        finally:
            # The router marks the scope it is given with the route (for the metrics).
            if "route" in as_get:
                scope["route"] = as_get["route"]

    def _get_only(self, scope: Scope) -> bool:
        """Whether a route answers GET at this path and none answers HEAD."""
        as_get = {**scope, "method": "GET"}
        has_get = False
        for route in self.routes:
            if route.matches(scope)[0] is Match.FULL:
                return False
            has_get = has_get or route.matches(as_get)[0] is Match.FULL
        return has_get
