"""Domain errors: what services raise; `error_handlers` renders them for HTTP.

Kept free of the web framework so that services and the CLI can use them without loading it.
"""

from __future__ import annotations


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


class Conflict(OTAError):
    status_code = 409
    default_code = "conflict"


class PayloadTooLarge(OTAError):
    status_code = 413
    default_code = "payload_too_large"


class RangeNotSatisfiable(OTAError):
    status_code = 416
    default_code = "range_not_satisfiable"


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
