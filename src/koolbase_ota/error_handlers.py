"""The one place that renders every error as `{"error": ..., "code": ...}` JSON."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from koolbase_ota.errors import OTAError
from koolbase_ota.metrics import ERRORS
from koolbase_ota.security import check_headers

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    429: "too_many_requests",
}


def error_response(
    status_code: int, message: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    ERRORS.labels(code).inc()
    return JSONResponse({"error": message, "code": code}, status_code=status_code, headers=headers)


async def _ota_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OTAError)
    return error_response(exc.status_code, exc.message, exc.code, exc.headers)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route"
    headers = dict(exc.headers or {})
    allow = [method.strip() for method in headers.get("Allow", "").split(",")]
    if exc.status_code == 405 and "GET" in allow and "HEAD" not in allow:
        # Every route with GET answers HEAD too (`ops.HeadAsGetMiddleware`).
        headers["Allow"] = ", ".join([*allow, "HEAD"])
    return error_response(exc.status_code, message.lower(), code, headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, _describe(exc.errors()), "invalid_request")


async def _client_gone(_request: Request, _exc: Exception) -> JSONResponse:
    # Nobody reads this answer; it only keeps a hung-up client out of the error log.
    return error_response(400, "the client disconnected", "client_disconnected")


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    # The statement and its parameters may hold secrets' hashes; only the kind is logged.
    logger.warning("database unavailable: %s", type(exc).__name__)
    return error_response(503, "the database is unavailable; try again", "database_unavailable")


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    # Answered by Starlette's outermost middleware, outside the one that adds these headers.
    headers = {name.decode(): value.decode() for name, value in check_headers()}
    return error_response(500, "internal server error", "internal_error", headers)


def _describe(errors: Any) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body",))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg"))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OTAError, _ota_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    for unavailable in (
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        sqlalchemy.exc.TimeoutError,
    ):
        app.add_exception_handler(unavailable, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered as every error is: JSON
    (it was a plain-text 400 "Disallowed CORS origin"), its CORS headers kept."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        headers = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-type", "content-length")
        }
        return error_response(
            400, f"CORS preflight refused: {refused} not allowed", "cors_refused", headers
        )
