"""Standard security headers on every answer, CORS only for the origins configured, and the
bound on the body of every request but an upload."""

from __future__ import annotations

import re
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from koolbase_ota.bundles.schemas import ErrorOut
from koolbase_ota.errors import PayloadTooLarge
from koolbase_ota.metrics import ERRORS

#: Sent on every answer: nothing is sniffed, framed or given a referrer.
STATIC_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
#: Sent on every answer but the interactive docs: JSON and zips need no script, style or frame.
CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
#: The interactive docs load scripts and styles, so they go without the CSP above.
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})


def check_headers() -> list[tuple[bytes, bytes]]:
    """The headers the SDK check (answered in front of this middleware) adds itself."""
    return [*STATIC_HEADERS, CSP]


class SecurityHeadersMiddleware:
    """Adds the standard headers to every HTTP answer; a bare ASGI middleware, no buffering."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = STATIC_HEADERS if scope["path"] in DOCS_PATHS else check_headers()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra:
                    # A route that chose its own value keeps it.
                    if name.decode() not in headers:
                        headers.raw.append((name, value))
            await send(message)

        await self.app(scope, receive, send_with_headers)


def cors_origins(setting: str) -> list[str]:
    """`KOOLBASE_OTA_CORS_ORIGINS`: comma-separated origins; empty means CORS stays off."""
    return [origin.strip().rstrip("/") for origin in setting.split(",") if origin.strip()]


#: The OpenAPI entry of a 429 answer, for every route a rate limit applies to.
RATE_LIMITED_RESPONSE: dict[str, Any] = {
    "model": ErrorOut,
    "description": "Rate limited (`code`: `rate_limited`); retry after `Retry-After` seconds",
    "headers": {
        "Retry-After": {
            "description": "Whole seconds to wait before trying again",
            "schema": {"type": "integer"},
        }
    },
}
#: The OpenAPI entry of a 413 answer to a body over `KOOLBASE_OTA_MAX_REQUEST_BODY_BYTES`.
BODY_TOO_LARGE_RESPONSE: dict[str, Any] = {
    "model": ErrorOut,
    "description": "The request body is over the limit (`code`: `request_too_large`)",
}
#: The one route whose body is bounded by the bundle size limit instead.
_UPLOAD = re.compile(r"/v1/projects/[^/]+/ota/upload/?")
BODY_TOO_LARGE_CODE = "request_too_large"


class BodyLimitMiddleware:
    """Refuses with 413 any request body but an upload's over `max_bytes`: at once when
    `Content-Length` says so, else as soon as the bytes read pass it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            scope["method"] == "POST" and _UPLOAD.fullmatch(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes

        def refusal() -> JSONResponse:  # built only for the rare request that gets it
            return JSONResponse(
                {
                    "error": f"the request body is larger than the limit of {limit} bytes",
                    "code": BODY_TOO_LARGE_CODE,
                },
                status_code=413,
                headers={"Connection": "close"},
            )

        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                ERRORS.labels(BODY_TOO_LARGE_CODE).inc()
                await refusal()(scope, receive, send)
                return
        received = 0
        passed = False
        replaced = False

        async def bounded_receive() -> Message:
            nonlocal received, passed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    passed = True
                    raise PayloadTooLarge("request body over the limit", code=BODY_TOO_LARGE_CODE)
            return message

        async def answer_413(message: Message) -> None:
            # Whatever the route or the framework made of the exception above (rendered it, or
            # wrapped it in a 400 "error parsing the body"), the client gets the 413.
            nonlocal replaced
            if passed and message["type"] == "http.response.start" and not replaced:
                replaced = True
                await refusal()(scope, receive, send)
            elif not replaced:
                await send(message)

        await self.app(scope, bounded_receive, answer_413)
