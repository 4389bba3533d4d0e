"""Standard security headers on every answer, and CORS only for the origins configured."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
