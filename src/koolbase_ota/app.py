"""`create_app(settings)`: builds the database, the store and the routes into one ASGI app."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from koolbase_ota import __version__, changes
from koolbase_ota.allocator import reuse_freed_memory
from koolbase_ota.audit_router import router as audit_router
from koolbase_ota.bundles.release_router import router as release_router
from koolbase_ota.bundles.router import router as bundles_router
from koolbase_ota.config import Settings
from koolbase_ota.db import Database, create_db_engine
from koolbase_ota.deps import AppContext
from koolbase_ota.error_handlers import JSONCORSMiddleware, install_error_handlers
from koolbase_ota.ops import HeadAsGetMiddleware, MetricsMiddleware
from koolbase_ota.ops import router as ops_router
from koolbase_ota.projects.router import router as channels_router
from koolbase_ota.ratelimit import RateLimits
from koolbase_ota.sdk.cache import CHECK_CONNECTIONS, CheckCache
from koolbase_ota.sdk.check import CheckEndpoint, is_check
from koolbase_ota.sdk.check import router as check_router
from koolbase_ota.sdk.codepush import CodePushEndpoint, is_code_push
from koolbase_ota.sdk.codepush import router as code_push_router
from koolbase_ota.sdk.downloads import router as downloads_router
from koolbase_ota.sdk.downloads import send_download
from koolbase_ota.security import (
    BODY_TOO_LARGE_RESPONSE,
    RATE_LIMITED_RESPONSE,
    BodyLimitMiddleware,
    SecurityHeadersMiddleware,
    check_headers,
    cors_origins,
)
from koolbase_ota.storage import open_store
from koolbase_ota.storage.signing import DOWNLOAD_PREFIX

logger = logging.getLogger(__name__)


class OTAApp(FastAPI):
    """FastAPI, with the SDK check answered in front of it: the hot path skips the framework."""

    check_endpoint: CheckEndpoint | None = None
    code_push_endpoint: CodePushEndpoint | None = None

    def checks(self) -> dict[str, CheckEndpoint]:
        """The checks answered in front of the framework, by path."""
        endpoints = (self.check_endpoint, self.code_push_endpoint)
        return {endpoint.path: endpoint for endpoint in endpoints if endpoint is not None}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.check_endpoint is not None and is_check(scope):
            await self.check_endpoint(scope, send)
            return
        if self.code_push_endpoint is not None and is_code_push(scope):
            await self.code_push_endpoint(scope, send)
            return
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].startswith(DOWNLOAD_PREFIX)
            and "http.response.zerocopysend" in scope.get("extensions", {})
            and await send_download(self.state.context, scope, send)
        ):
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> OTAApp:
    """The app for `settings`; nothing is created at import time, so tests can build many."""
    settings = settings.resolved()
    db = Database(
        create_db_engine(
            settings.database_url,
            timeout_seconds=settings.database_timeout_seconds,
            connections=settings.database_connections,
        )
    )
    store = open_store(settings)
    # The checks' own connections, beside the dashboard's (see `koolbase_ota.sdk.cache`).
    check_db = Database(
        create_db_engine(
            settings.database_url,
            timeout_seconds=settings.database_timeout_seconds,
            connections=CHECK_CONNECTIONS,
        )
    )
    cache = CheckCache(
        db=check_db,
        store=store,
        url_ttl_seconds=settings.url_ttl_seconds,
        signing_key=settings.secret_key,
        answer_within_seconds=settings.database_timeout_seconds,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            await cache.start()
        except Exception as exc:
            # A worker (re)started while the database is down failed its start with a
            # traceback and served nothing. It serves instead (/healthz alive, /readyz and
            # whatever needs the database 503) and, from the change log's first entry, reads
            # every change once the database is back: nothing it caches meanwhile goes stale.
            logger.warning(
                "database unavailable at start (%s); serving, and reading the change log "
                "from its start once the database is back",
                type(exc).__name__,
            )
        # Everything built so far lives as long as the process: move it out of the collector's
        # way, so full collections stay short and do not stall in-flight checks.
        gc.collect()
        gc.freeze()
        background = [
            asyncio.create_task(cache.run(every_seconds=settings.cache_refresh_seconds)),
            asyncio.create_task(changes.prune_forever(db)),
        ]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            db.dispose()
            check_db.dispose()

    app = OTAApp(
        title="koolbase-ota",
        version=__version__,
        description="Self-hostable over-the-air update server for Flutter apps.",
        lifespan=lifespan,
    )
    limits = RateLimits(settings)
    app.state.context = AppContext(
        settings=settings, db=db, store=store, check_cache=cache, limits=limits
    )
    app.check_endpoint = CheckEndpoint(cache, extra_headers=check_headers(), limits=limits)
    app.code_push_endpoint = CodePushEndpoint(cache, extra_headers=check_headers(), limits=limits)
    install_error_handlers(app)
    app.add_middleware(HeadAsGetMiddleware, routes=app.router.routes)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(MetricsMiddleware, routes=app.router.routes)
    origins = cors_origins(settings.cors_origins)
    if origins:
        # Only for the configured origins: a browser page elsewhere cannot read any answer.
        app.add_middleware(
            JSONCORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Next-Cursor", "Link"],
            max_age=600,
        )
    # Added last, so outermost: preflight answers and errors get the headers too.
    app.add_middleware(SecurityHeadersMiddleware)
    app.include_router(ops_router)
    # Every dashboard route may answer 429 once an address fails authentication too often, and
    # 413 to a body over the limit (the upload documents its own 413).
    dashboard_errors: dict[int | str, dict[str, Any]] = {
        413: BODY_TOO_LARGE_RESPONSE,
        429: RATE_LIMITED_RESPONSE,
    }
    app.include_router(bundles_router, responses=dashboard_errors)
    app.include_router(release_router, responses=dashboard_errors)
    app.include_router(channels_router, responses=dashboard_errors)
    app.include_router(audit_router, responses=dashboard_errors)
    app.include_router(check_router)
    app.include_router(code_push_router)
    app.include_router(downloads_router)
    return app


def create_app_from_env() -> OTAApp:
    """Entry point for server workers: each reads the same environment the CLI was given."""
    reuse_freed_memory()
    return create_app(Settings())
