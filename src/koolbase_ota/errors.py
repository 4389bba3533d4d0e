"""Domain errors, and the one place that renders every error as `{"error": ..., "code": ...}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)


class OTAError(Exception):
    """Base of every error a service raises; each subclass fixes the HTTP status."""

    status_code = 400
    default_code = "bad_request"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.headers = headers


class InvalidInput(OTAError):
    status_code = 400
    default_code = "invalid_request"


class Unauthorized(OTAError):
    status_code = 401
    default_code = "unauthorized"


class Forbidden(OTAError):
    status_code = 403
    default_code = "forbidden"


class NotFound(OTAError):
    status_code = 404
    default_code = "not_found"


class PayloadTooLarge(OTAError):
    status_code = 413
    default_code = "payload_too_large"


class UnsupportedMediaType(OTAError):
    status_code = 415
    default_code = "unsupported_media_type"


class Unprocessable(OTAError):
    status_code = 422
    default_code = "invalid_bundle"


class ServiceUnavailable(OTAError):
    status_code = 503
    default_code = "service_unavailable"


class StorageUnavailable(ServiceUnavailable):
    default_code = "storage_unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    default_code = "database_unavailable"


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
    return error_response(exc.status_code, message.lower(), code, dict(exc.headers or {}))


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, _describe(exc.errors()), "invalid_request")


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal server error", "internal_error")


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
    app.add_exception_handler(Exception, _unexpected_error)
