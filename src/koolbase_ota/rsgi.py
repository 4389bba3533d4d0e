"""The app on granian's RSGI interface: downloads straight from Rust, the rest through ASGI.

RSGI lets the server send a file, or one range of it, without the bytes passing through
Python; on ASGI granian can only send whole files that way, so ranges were read into Python
first. `RSGIApp` answers valid signed downloads itself, has the checks' bare endpoints answer
on RSGI directly, and hands every other request to the same ASGI app that tests run
in-process, through a small bridge that maps RSGI's scope and protocol onto ASGI's scope,
`receive` and `send`.

`koolbase-ota serve` runs this; `KOOLBASE_OTA_SERVER_INTERFACE=asgi` runs the ASGI app on
granian directly instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any
from urllib.parse import quote

from koolbase_ota.allocator import reuse_freed_memory
from koolbase_ota.app import OTAApp, create_app
from koolbase_ota.config import Settings
from koolbase_ota.sdk.check import CheckEndpoint
from koolbase_ota.sdk.downloads import (
    Plan,
    answer_headers,
    count_download,
    left_to_app,
    served_plan,
)
from koolbase_ota.storage.signing import DOWNLOAD_PREFIX

logger = logging.getLogger(__name__)

_INTERNAL_ERROR = b'{"error":"internal server error","code":"internal_error"}'


class RSGIApp:
    """An `OTAApp` served over RSGI; granian calls `__rsgi_init__`, `__rsgi__`, `__rsgi_del__`."""

    def __init__(self, app: OTAApp) -> None:
        self.app = app
        #: The checks' bare endpoints by path: called with the little of a request they read.
        self.checks: dict[str, CheckEndpoint] = app.checks()
        self._lifespan: contextlib.AbstractAsyncContextManager[Any] | None = None

    # Lifespan: granian calls these with the worker's loop, before and after serving.

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._lifespan = self.app.router.lifespan_context(self.app)
        loop.run_until_complete(self._lifespan.__aenter__())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._lifespan is not None:
            loop.run_until_complete(self._lifespan.__aexit__(None, None, None))

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":
            protocol.close(1003)  # no WebSocket routes here
            return
        if scope.method == "GET":
            path = scope.path
            endpoint = self.checks.get(path)
            if endpoint is not None:
                await endpoint.rsgi(scope, protocol)
                return
            if path.startswith(DOWNLOAD_PREFIX):
                left = await self._send_file(scope, protocol)
                if left is not None:
                    await _bridge(self.app, scope, protocol, left)
                return
        await _bridge(self.app, scope, protocol)

    async def _send_file(self, scope: Any, protocol: Any) -> dict[str, Any] | None:
        """Sends a valid download's file or range from Rust (None); else what the ASGI scope
        of the request left to the app needs besides (a refusal, for the route to raise).

        What `served_plan` leaves to the app is answered by it, exactly as on ASGI.
        """
        started = time.perf_counter()
        headers = scope.headers
        context = self.app.state.context
        plan = await served_plan(
            context,
            scope.path[len(DOWNLOAD_PREFIX) :],  # granian decodes the path: not again
            scope.query_string,
            range_header=headers.get("range"),
            if_range="if-range" in headers,
            origin="origin" in headers,
        )
        if not isinstance(plan, Plan):
            return left_to_app(plan, started)
        status, answer = answer_headers(plan)
        if plan.span is None:
            protocol.response_file(status, answer, str(plan.path))
        else:
            start, end = plan.span
            protocol.response_file_range(status, answer, str(plan.path), start, end)
        count_download(context.check_cache, status, started)
        return None


def _address(text: str) -> tuple[str, int] | None:
    """`host:port` (or `[v6]:port`) as ASGI's (host, port)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


async def _bridge(
    app: OTAApp, scope: Any, protocol: Any, extra: dict[str, Any] | None = None
) -> None:
    """One request through the ASGI app: RSGI's scope and protocol as ASGI's (with `extra`)."""
    # granian hands over the path percent-decoded, as ASGI's `path`; decoding it again read
    # `%2541` as `A`. The raw bytes are gone: `raw_path` is the path encoded again.
    path: str = scope.path
    asgi_scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": scope.http_version,
        "method": scope.method,
        "scheme": scope.scheme,
        "path": path,
        "raw_path": quote(path).encode("ascii"),
        "query_string": scope.query_string.encode("latin-1", "replace"),
        "root_path": "",
        "headers": [
            (name.encode("latin-1", "replace"), value.encode("latin-1", "replace"))
            for name, value in scope.headers.items()
        ],
        "client": _address(scope.client),
        "server": _address(scope.server),
        "extensions": {"http.response.pathsend": {}},
        "state": {},
        **(extra or {}),
    }
    receive = _Receiver(protocol)
    sender = _Sender(protocol)
    try:
        await app(asgi_scope, receive, sender)
    except Exception:
        # The app's own handlers answer every error; this is the net below them.
        logger.exception("unhandled error in %s %s", scope.method, path)
        if not sender.started:
            protocol.response_bytes(500, [("content-type", "application/json")], _INTERNAL_ERROR)
        return
    if not sender.started:
        protocol.response_empty(500, [])


class _Receiver:
    """ASGI `receive`: the body in the chunks the server has, then a wait for disconnect."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.chunks: AsyncIterator[bytes] | None = None
        self.done = False

    async def __call__(self) -> dict[str, Any]:
        if not self.done:
            if self.chunks is None:
                self.chunks = self.protocol.__aiter__()
            assert self.chunks is not None
            try:
                chunk = await self.chunks.__anext__()
            except StopAsyncIteration:
                self.done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": bytes(chunk), "more_body": True}
        await self.protocol.client_disconnect()
        return {"type": "http.disconnect"}


class _Sender:
    """ASGI `send`: one body in one call, several as a stream, a path as a file."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.status = 500
        self.headers: list[tuple[str, str]] = []
        self.stream: Any = None
        self.started = False

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.headers = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in message.get("headers", ())
            ]
        elif kind == "http.response.body":
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.stream is None:
                if not more:
                    self.started = True
                    self.protocol.response_bytes(self.status, self.headers, body)
                    return
                self.started = True
                self.stream = self.protocol.response_stream(self.status, self.headers)
            if body:
                await self.stream.send_bytes(body)
        elif kind == "http.response.pathsend":
            self.started = True
            self.protocol.response_file(self.status, self.headers, message["path"])


def create_rsgi_app(settings: Settings) -> RSGIApp:
    return RSGIApp(create_app(settings))


def create_rsgi_app_from_env() -> RSGIApp:
    """Entry point for server workers: each reads the same environment the CLI was given."""
    reuse_freed_memory()
    return create_rsgi_app(Settings())
