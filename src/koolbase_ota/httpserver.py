"""The HTTP/1.1 server `koolbase-ota serve` runs: uvicorn's httptools protocol, with our hot paths.

uvicorn hands every request to the ASGI app as a task with a scope and messages. That costs
more than the whole of a warm check, which needs no I/O. `OTAHttpProtocol` changes three things:

- **Warm checks are answered inside the parser's callbacks**, with no task, scope or message:
  the seed check and the code-push check, when the cache holds all they need (a cold entry
  goes through the app as any other request, and its database read happens there). A read
  that repeats, byte for byte, a whole check request seen before (devices of one app send the
  same bytes) is not even parsed again: what the parser made of it is kept (`replays_of`);
  nor is one that repeats a check's head under another plain request line (devices that
  send their id in the query: `heads_of`). A check of the plainest kind that repeats neither
  (every request its own header, as behind a proxy) is read by the server itself
  (`read_plain_get`), only where httptools would make exactly the same of its bytes.
- **Files go out with sendfile(2)**: the app gets ASGI's `http.response.pathsend` and
  `http.response.zerocopysend` extensions, and the server sends the file, or one range of it,
  without the bytes passing through Python (on the standard asyncio loop, which `serve` uses
  for this; other loops fall back to reading the file in chunks).
- **Request heads are bounded**: at most `MAX_HEADERS` headers and `MAX_HEAD_BYTES` bytes
  (else 431), read within the header timeout (else the connection is closed: slowloris), and a
  malformed request gets our JSON error instead of uvicorn's plain text.

Everything else (routing, bodies, keep-alive, pipelining, graceful shutdown, workers) is
uvicorn's. The in-process test servers run this protocol too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import httptools
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from koolbase_ota.sdk.check import DEVICE_ID_FIELD, CheckEndpoint

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("koolbase_ota.access")

#: A request head (request line and headers) larger than this, or with more headers, is a 431.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
#: Idle keep-alive connections are closed after this long: longer than the usual load
#: balancer idle timeout (60 s), so the balancer, not us, closes first (no 502 on reuse).
KEEP_ALIVE_SECONDS = 75
#: Request body bytes buffered per connection before reading pauses until the app takes them.
BODY_BUFFER_BYTES = 1024 * 1024
#: Body pieces smaller than this are buffered by copying them together (`_Pieces`).
SMALL_PIECE_BYTES = 4096
#: A body piece this large means a large body: the connection then reads `BODY_READ_BYTES`
#: at a time (`OTAHttpProtocol._read_larger`).
LARGE_BODY_PIECE_BYTES = 64 * 1024
BODY_READ_BYTES = 1024 * 1024

_SENDFILE_EXTENSIONS: dict[str, dict[str, Any]] = {
    "http.response.pathsend": {},
    "http.response.zerocopysend": {},
}
_CHUNK = 256 * 1024


def _error_response(status: int, message: str, code: str) -> bytes:
    body = json.dumps({"error": message, "code": code}).encode()
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


_BAD_REQUEST = _error_response(400, "malformed HTTP request", "bad_request")
_HEAD_TOO_LARGE = _error_response(
    431,
    f"request headers too large (at most {MAX_HEADERS} headers, {MAX_HEAD_BYTES} bytes)",
    "headers_too_large",
)


#: Status line and fixed headers of the checks' answers, by (status, endpoint); and whole
#: answers by (status, endpoint, body, keep-alive), holding their body, so that an answer the
#: check cache reuses (`CheckEndpoint.cached_outcome`) is not rendered again. Both are for
#: uvicorn's current default headers, and emptied when it renews them (the date, once a second).
_heads: dict[tuple[int, int], bytes] = {}
_answers: dict[tuple[int, int, int, bool], tuple[bytes, bytes]] = {}
_rendered_for: list[list[tuple[bytes, bytes]]] = [[]]
#: Whole answers kept at most (within one second).
MAX_RENDERED = 1024


def render_answer(
    status: int,
    endpoint: CheckEndpoint,
    defaults: list[tuple[bytes, bytes]],
    body: bytes,
    keep_alive: bool,
    retry_after: int | None,
) -> bytes:
    """A check's whole answer: the status line, `defaults` (uvicorn's default headers, the date
    among them), the endpoint's headers and the body. One without `retry_after` (all but a 429)
    is kept, and the same bytes come back for the same body and `defaults`."""
    if _rendered_for[0] is not defaults:
        _heads.clear()
        _answers.clear()
        _rendered_for[0] = defaults
    key = (status, id(endpoint), id(body), keep_alive)
    if retry_after is None:
        found = _answers.get(key)
        if found is not None and found[0] is body:
            return found[1]
    head = _heads.get(key[:2])
    if head is None:
        parts = [STATUS_LINE[status]]
        for name, value in [*defaults, *endpoint.headers]:
            parts += [name, b": ", value, b"\r\n"]
        head = _heads[key[:2]] = b"".join(parts)
    wait = b"" if retry_after is None else b"retry-after: %d\r\n" % retry_after
    close = b"" if keep_alive else b"connection: close\r\n"
    answer = b"%s%scontent-length: %d\r\n%s\r\n%s" % (head, wait, len(body), close, body)
    if retry_after is None:
        if len(_answers) >= MAX_RENDERED:
            _answers.clear()
        # The entry holds the body, so no other object can take its id while it is kept.
        _answers[key] = (body, answer)
    return answer


#: Bounds of the parsed checks kept for replay (`OTAHttpProtocol._replay`): entries per
#: process, and bytes of one request.
MAX_REPLAYS = 1024
MAX_REPLAY_BYTES = 2048


@dataclass(slots=True)
class _Parsed:
    """What the parser (or `read_plain_get`) made of one whole check request: all its answer
    depends on. Never changed once made (kept ones are shared by connections); not frozen, as
    a frozen dataclass costs a microsecond more to make, and one is made per request read
    by `_answer_plain`."""

    endpoint: CheckEndpoint
    path: bytes
    query: bytes
    api_key: str | None
    headers: list[tuple[bytes, bytes]]
    http_version: str
    keep_alive: bool


class _NotKept:
    """What a table of replays holds for bytes it has never seen."""


_NOT_KEPT = _NotKept()

#: Bytes seen once (None) or again (what the parser made of them): only bytes that come a
#: second time are kept parsed, so a stream that never repeats costs its bytes, not a parse.
_Kept = dict[bytes, _Parsed | None]


@dataclass(slots=True)
class _Replays:
    """What the parser made of check requests, per app and process (`OTAHttpProtocol._replay`):
    whole requests by their exact bytes, and heads by their bytes after the request line."""

    requests: _Kept = field(default_factory=dict)
    heads: _Kept = field(default_factory=dict)


_replays: weakref.WeakKeyDictionary[Any, _Replays] = weakref.WeakKeyDictionary()

#: How the request line of a check whose head may be replayed ends.
_HTTP_11 = b" HTTP/1.1"
#: A request target a replayed head takes as it is (anything else goes to the parser): a path
#: and query of characters RFC 3986 allows unescaped, without `%`, `#`, `[` or `]`.
_PLAIN_TARGET = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?]*+")

#: A header line the server reads itself (`read_plain_get`): a token, a colon, and a value of
#: visible ASCII, spaces and tabs. Leading spaces and tabs are not the value's; trailing ones
#: are, as httptools keeps them. No obs-fold, no obs-text, no bare CR or LF.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]++"
_VALUE = rb"(?:[\x21-\x7e][\t\x20-\x7e]*+)?+"
_HEADER_LINES = re.compile(rb"(%s):[ \t]*+(%s)\r\n" % (_TOKEN, _VALUE))
#: The plainest whole request head: `GET <plain target> HTTP/1.1`, at most `MAX_HEADERS` header
#: lines, and the empty line, ending the read.
_PLAIN_GET = re.compile(
    rb"GET (%s) HTTP/1\.1\r\n((?:%s:[ \t]*+%s\r\n){0,%d}+)\r\n"
    % (_PLAIN_TARGET.pattern, _TOKEN, _VALUE, MAX_HEADERS)
)
#: Headers that put a request beyond `read_plain_get`: a body, or a say in the connection
#: (llhttp takes `Proxy-Connection` as it takes `Connection`).
_NOT_PLAIN = frozenset(
    [
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"proxy-connection",
        b"upgrade",
        b"expect",
    ]
)


def read_plain_get(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes | None] | None:
    """The target, the headers (names in lower case) and the last `x-api-key` of `data`, when it
    is exactly one whole request head of the plainest kind (`_PLAIN_GET`), with no body and no
    say in the connection (no `_NOT_PLAIN` header, but a single `content-length: 0`): what
    httptools makes of the same bytes, for far less. None for anything else, which the parser
    then reads; nothing the parser refuses is read here."""
    match = _PLAIN_GET.fullmatch(data)
    if match is None:
        return None
    headers = [(name.lower(), value) for name, value in _HEADER_LINES.findall(match[2])]
    api_key = None
    length_seen = False
    for name, value in headers:
        if name == b"x-api-key":
            api_key = value
        elif name in _NOT_PLAIN:
            if name != b"content-length" or value != b"0" or length_seen:
                return None
            length_seen = True
    return match[1], headers, api_key


def _replays_of(app: Any) -> _Replays:
    replays = _replays.get(app)
    if replays is None:
        replays = _replays[app] = _Replays()
    return replays


def replays_of(app: Any) -> _Kept:
    """The whole check requests seen for `app`'s connections in this process."""
    return _replays_of(app).requests


def heads_of(app: Any) -> _Kept:
    """The check request heads (less their request line) seen for `app`'s connections: the
    same headers under another request line. The devices of one app send the same headers
    and each its own `device_id` in the query."""
    return _replays_of(app).heads


def _note(table: _Kept, key: bytes, parsed: _Parsed | None) -> None:
    if len(table) >= MAX_REPLAYS:
        table.clear()
    table[key] = parsed


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request head past its bounds."""


class _Pieces:
    """Request body pieces waiting for the app, joined when it takes them (`bytes()`).

    Pieces under `SMALL_PIECE_BYTES` are gathered into a bytearray: a chunked body may come a
    few bytes a chunk, and an object and a list slot each (56 bytes for 2) made the buffer that
    pauses reading at `BODY_BUFFER_BYTES` of body hold 20 times that in memory.
    """

    __slots__ = ("gathering", "pieces", "size")

    def __init__(self, first: bytes | bytearray, second: bytes) -> None:
        self.pieces: list[bytes | bytearray] = []
        self.gathering: bytearray | None = None
        self.size = 0
        self.add(first)
        self.add(second)

    def add(self, piece: bytes | bytearray) -> None:
        self.size += len(piece)
        if len(piece) >= SMALL_PIECE_BYTES:
            self.pieces.append(piece)
            self.gathering = None
        elif self.gathering is not None:
            self.gathering += piece
        else:
            self.gathering = bytearray(piece)
            self.pieces.append(self.gathering)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)


class _FlowControl(FlowControl):
    """uvicorn's, with reading kept paused while pipelined requests wait their turn or
    answers wait to be sent.

    uvicorn pauses reading when a request is queued behind one in flight, and resumes it after
    every response and whenever the app asks for a body. A client that pipelines without end
    then had a whole read of requests (thousands, each with its cycle) queued per answer:
    memory without bound. Every queued request but the last has its whole body (the parser
    reads them in order), so the only one that may still need reading is the last, which
    runs once the queue is empty: reading resumes then. Likewise while the write buffer is
    past its high-water mark (`OTAHttpProtocol.pause_writing`): a response that ends there
    must not let checks answered inline pile up behind it; reading resumes as it drains."""

    def __init__(self, transport: asyncio.Transport, pipeline: deque[Any]) -> None:
        super().__init__(transport)
        self.pipeline = pipeline
        #: Reading was asked to resume while answers waited to drain: it does once they do.
        self.deferred = False

    def resume_reading(self) -> None:
        if self.write_paused:
            self.deferred = True
        elif not self.pipeline:
            super().resume_reading()


class OTAHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with warm checks answered inline and files sent by sendfile.

    The checks and the settings are found on the loaded app (`koolbase_ota.app.OTAApp`).
    """

    flow: _FlowControl

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = self.app
        settings = app.state.context.settings
        self.header_timeout: float = settings.header_timeout_seconds
        #: Our access log (uvicorn's is off: it would log query strings).
        self.access_log = settings.access_log
        #: The checks' endpoints by raw request path.
        self.checks: dict[bytes, CheckEndpoint] = {
            path.encode(): endpoint for path, endpoint in app.checks().items()
        }
        #: Parsed check requests by their exact bytes, and heads by theirs after the request
        #: line, shared by the process's connections.
        replays = _replays_of(app)
        self.replays = replays.requests
        self.heads = replays.heads
        #: The answer to write once the current request's message is complete, and whether
        #: the connection stays open after it.
        self.fast_answer: bytes | None = None
        self.keep_alive = True
        #: Between two requests (no part of the next one read yet); messages begun in the
        #: current read; the endpoint of a check it answers inline (see `replays_of`).
        self.at_boundary = True
        self.begun = 0
        self.answered: CheckEndpoint | None = None
        self.api_key: bytes | None = None
        #: Bytes, reads and headers of the request head so far (bytes None once it is
        #: complete), and the size of its URL, header names and values.
        self.head_bytes: int | None = 0
        self.head_reads = 0
        self.head_headers = 0
        self.head_size = 0
        self.head_timer: asyncio.TimerHandle | None = None
        #: When the client last sent something or its last response ended (`time.monotonic`,
        #: the loop's clock), and the one idle timer that checks it: cheaper than uvicorn's
        #: timer re-armed after every response.
        self.last_seen = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        #: Whether this connection's reads were made larger for a large body.
        self.large_reads = False

    # Connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _FlowControl(transport, self.pipeline)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets this only on sockets it created itself; a worker's inherited
            # listening socket gives accepted sockets without it, and a response in two
            # writes would then wait for the client's delayed ACK (40 ms).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_head_timer()
        self.last_seen = time.monotonic()
        self.idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        super().connection_lost(exc)

    def _idle_check(self) -> None:
        """Closes a connection idle for the keep-alive timeout with no request in flight."""
        self.idle_timer = None
        if self.transport.is_closing():
            return
        idle = time.monotonic() - self.last_seen
        # A request in flight, or one whose head is arriving (the header timeout's case).
        # Not a check whose answer waits for a body the client has gone quiet on: that is
        # the client's silence, as between two requests.
        busy = (self.cycle is not None and not self.cycle.response_complete) or (
            self.head_bytes is not None and self.head_reads > 0
        )
        if idle >= self.timeout_keep_alive and not busy:
            self.transport.close()
            return
        wait = self.timeout_keep_alive - idle if idle < self.timeout_keep_alive else 1.0
        self.idle_timer = self.loop.call_later(wait, self._idle_check)

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        # A read that may be one whole request, from its first byte.
        replayable = self.at_boundary and len(data) <= MAX_REPLAY_BYTES
        kept: _Parsed | _NotKept | None = _NOT_KEPT
        head = None
        if replayable:
            kept = self.replays.get(data, _NOT_KEPT)
            if isinstance(kept, _Parsed):
                if self._replay(kept, kept.endpoint, kept.path, kept.query):
                    return
            elif DEVICE_ID_FIELD in data:
                # All after the request line: the same for the devices of one app, which
                # differ in their `device_id` (other requests that never repeat skip this).
                head = data[data.find(b"\r\n") :]
                kept_head = self.heads.get(head)
                seen = kept is None
                if kept_head is not None and self._replay_head(data, head, kept_head, seen=seen):
                    return
            if self._answer_plain(data, kept, head):
                return
        self.begun = 0
        self.answered = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            return  # no WebSocket routes here: the request goes on as plain HTTP
        except httptools.HttpParserError as exc:
            # httptools wraps a callback's exception in its own.
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse(_HEAD_TOO_LARGE)
                return
            logger.info("malformed HTTP request: %s", type(exc).__name__)
            self._refuse(_BAD_REQUEST)
            return
        answered = self.answered
        if answered is not None and replayable and self.begun == 1 and self.at_boundary:
            # This read was one whole check, parsed from its first byte and answered inline:
            # the same bytes parse the same again, so they need not be parsed again.
            _note(self.replays, data, None if kept is _NOT_KEPT else self._parsed(answered))
            if head is not None:
                self._keep_head(data, head, lambda: self._parsed(answered))
        if self.head_bytes is not None:
            # Still inside a request head after this read. A read the head began in may also
            # hold the end of the request before it, so only the reads after it count in
            # full; the callbacks bound each header and the URL on their own.
            if self.head_reads:
                self.head_bytes += len(data)
                if self.head_bytes > MAX_HEAD_BYTES:
                    self._refuse(_HEAD_TOO_LARGE)
                    return
            self.head_reads += 1
            self._arm_head_timer()

    def on_response_complete(self) -> None:
        # uvicorn's, less its keep-alive timer armed after every response: `_idle_check` is
        # the one timer, and the connection is idle from now (not from when the request came,
        # which for a long download would close it as soon as the file was sent).
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.last_seen = time.monotonic()
        self.flow.resume_reading()  # not while requests are queued: see `_FlowControl`
        if self.head_bytes is not None:
            # The next request's head began behind this response: its time starts now.
            self._cancel_head_timer()
            self._arm_head_timer()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)

    def pause_writing(self) -> None:
        # The answers not yet sent passed the transport's high-water mark. The app's path
        # waits for them to drain, one response at a time; a check answered inline does not,
        # so a client that sends checks and never reads would have their answers buffered
        # without end. Read no more from it until it takes them.
        super().pause_writing()
        self.flow.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        # Unless the app's path holds reading paused for itself (a response still going
        # out) and did not ask for it meanwhile (a body it waits for): it resumes it when
        # that response ends.
        flow = self.flow
        if flow.deferred or self.cycle is None or self.cycle.response_complete:
            flow.deferred = False
            flow.resume_reading()

    def send_400_response(self, msg: str) -> None:
        self._refuse(_BAD_REQUEST)

    def _refuse(self, answer: bytes) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def _arm_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.head_bytes is None or self.transport.is_closing():
            return
        if (self.cycle is not None and not self.cycle.response_complete) or self.pipeline:
            # A head pipelined behind a response still going out (a long download) is not
            # read on until that response ends: its time starts again then.
            return
        # No request head completed in time: a client that never finishes (slowloris).
        self.transport.close()

    # Parser callbacks

    def on_message_begin(self) -> None:
        # uvicorn's, less the scope: a warm check never needs one (see `on_headers_complete`).
        self.at_boundary = False
        self.begun += 1
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        #: The last x-api-key header's value, as the ASGI endpoint reads it.
        self.api_key = None
        self.fast_answer = None
        self.head_bytes = 0
        self.head_reads = 0
        self.head_headers = 0
        self.head_size = 0

    def _new_scope(self) -> None:
        """The scope uvicorn's `on_message_begin` would have made."""
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's, inline (this runs for every header of every request), with our bounds:
        # the URL, names and values together, however the head came in reads.
        self.head_headers += 1
        self.head_size += len(name) + len(value)
        if self.head_headers > MAX_HEADERS or self.head_size > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        name = name.lower()
        if name == b"x-api-key":
            self.api_key = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_bytes = None
        self._cancel_head_timer()
        if (
            self.checks
            and (self.cycle is None or self.cycle.response_complete)
            and not self.pipeline
            and not self.expect_100_continue
            and self.parser.get_method() == b"GET"
        ):
            path, _, query = self.url.partition(b"?")
            endpoint = self.checks.get(path)
            # A target with a fragment (no SDK sends one) goes to the app, which leaves the
            # fragment out of the query as uvicorn does.
            if endpoint is not None and b"#" not in query:
                api_key = None if self.api_key is None else self.api_key.decode("latin-1")
                # As uvicorn decides it (an HTTP/1.0 connection is never kept), and read now:
                # once the message is complete the parser has forgotten it.
                self.keep_alive = (
                    self.parser.should_keep_alive() and self.parser.get_http_version() != "1.0"
                )
                self.fast_answer = self._answer(
                    endpoint, path, query, api_key, self.headers, None, self.keep_alive
                )
                if self.fast_answer is not None:
                    self.answered = endpoint
                    return
        self._new_scope()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        # uvicorn's, with a larger buffer before reading pauses (at its 64 KiB a 50 MiB upload
        # paused and resumed the socket 800 times, each a round of the event loop), and without
        # copying the body: uvicorn appends each piece to a bytearray, which `receive()` copies
        # out (`bytes(cycle.body)`), twice every byte of an upload. A piece that finds the
        # buffer empty is kept as it is (`bytes()` of bytes is the same object); pieces that
        # queue up behind it are joined once, when received.
        cycle = self.cycle
        if self.fast_answer is not None or cycle.response_complete:
            return
        if len(body) >= LARGE_BODY_PIECE_BYTES and not self.large_reads:
            self._read_larger()
        buffered: bytes | bytearray | _Pieces = cycle.body
        if not buffered:
            cycle.body = body  # type: ignore[assignment]
        elif isinstance(buffered, _Pieces):
            buffered.add(body)
        else:
            cycle.body = _Pieces(buffered, body)  # type: ignore[assignment]
        if len(cycle.body) > BODY_BUFFER_BYTES:
            self.flow.pause_reading()
        cycle.message_event.set()

    def _read_larger(self) -> None:
        """A large body is coming (an upload): read the socket a MiB at a time from now on.

        asyncio's transport reads at most 256 KiB, and each read is a round of the event loop
        and a trip through the protocol and the app; a 50 MiB upload took 200. Only such
        connections read more (devices' checks never have a body): each read allocates its
        size before it shrinks to what came.
        """
        self.large_reads = True
        if isinstance(getattr(self.transport, "max_size", None), int):
            self.transport.max_size = BODY_READ_BYTES  # type: ignore[attr-defined]

    def on_message_complete(self) -> None:
        self.at_boundary = True
        answer = self.fast_answer
        if answer is None:
            super().on_message_complete()
            return
        self.fast_answer = None
        self.transport.write(answer)
        self.server_state.total_requests += 1
        if not self.keep_alive:
            self.transport.close()

    # The warm check

    def _answer(
        self,
        endpoint: CheckEndpoint,
        path: bytes,
        query: bytes,
        api_key: str | None,
        headers: list[tuple[bytes, bytes]],
        http_version: str | None,
        keep_alive: bool,
    ) -> bytes | None:
        """The whole response to a check the cache can answer, or None to leave it to the app
        (which also answers when the cached check fails: never a broken connection for it).
        `http_version` None is the request being parsed."""
        started = time.perf_counter()
        limits = endpoint.limits
        try:
            outcome = endpoint.cached_outcome(
                api_key,
                lambda: limits.peer_address(self.client, headers) if limits else "",
                query,
            )
        except Exception:
            logger.exception("the cached check failed; the app answers it")
            return None
        if outcome is None:
            return None
        status, body, hit, error, retry_after = outcome
        defaults = self.server_state.default_headers
        answer = render_answer(status, endpoint, defaults, body, keep_alive, retry_after)
        elapsed = time.perf_counter() - started
        endpoint.tally.record(status, elapsed, hit=hit, error=error)
        if self.access_log:
            version = http_version or self.parser.get_http_version()
            self._log_access("GET", path.decode("latin-1"), version, status, elapsed)
        return answer

    def _parsed(self, endpoint: CheckEndpoint) -> _Parsed:
        """What the parser made of the request just answered inline, for `_replay`."""
        path, _, query = self.url.partition(b"?")
        return _Parsed(
            endpoint=endpoint,
            path=path,
            query=query,
            api_key=None if self.api_key is None else self.api_key.decode("latin-1"),
            headers=self.headers,
            http_version=self.parser.get_http_version(),
            keep_alive=self.keep_alive,
        )

    def _answer_plain(
        self, data: bytes, kept: _Parsed | _NotKept | None, head: bytes | None
    ) -> bool:
        """Answer a read that is one whole check of the plainest kind (`read_plain_get`) from
        the server's own reading of it, without the parser; False to parse it after all. A
        read that never repeats whole or in its head (every request its own header, as
        behind a proxy that adds the client's address) is read here. `kept` and `head` are
        as `data_received` found them: the read is noted for replay as a parsed one is."""
        read = read_plain_get(data)
        if read is None:
            return False
        target, headers, api_key = read
        path, _, query = target.partition(b"?")
        endpoint = self.checks.get(path)
        if endpoint is None:
            return False
        parsed = _Parsed(
            endpoint=endpoint,
            path=path,
            query=query,
            api_key=None if api_key is None else api_key.decode("latin-1"),
            headers=headers,
            http_version="1.1",
            keep_alive=True,
        )
        if not self._replay(parsed, endpoint, path, query):
            return False
        _note(self.replays, data, None if kept is _NOT_KEPT else parsed)
        if head is not None:
            self._keep_head(data, head, lambda: parsed)
        return True

    def _keep_head(self, data: bytes, head: bytes, parsed: Callable[[], _Parsed]) -> None:
        """Note `head`, all after the request line of `data`, one whole check just read and
        answered (see `_replay_head`): kept parsed (`parsed()`) once it comes again, if
        HTTP/1.1."""
        if not data.startswith(_HTTP_11, len(data) - len(head) - len(_HTTP_11)):
            return
        seen = self.heads.get(head, _NOT_KEPT)
        if seen is None:
            self.heads[head] = parsed()
        elif seen is _NOT_KEPT:
            _note(self.heads, head, None)

    def _replay_head(self, data: bytes, head: bytes, kept: _Parsed, *, seen: bool) -> bool:
        """Answer a read that is a plain `GET <check path>?<query> HTTP/1.1` line before a head
        already parsed in a check (`head`, all after the line; `kept`, its parse), without
        parsing it: the parser would make the same of it but the URL. False to parse it after
        all. `seen`: the whole read came once before."""
        line = data[: len(data) - len(head)]
        if not (line.startswith(b"GET /") and line.endswith(_HTTP_11)):
            return False
        target = line[4 : -len(_HTTP_11)]
        if _PLAIN_TARGET.fullmatch(target) is None:
            return False
        path, _, query = target.partition(b"?")
        endpoint = self.checks.get(path)
        if endpoint is None or not self._replay(kept, endpoint, path, query):
            return False
        # Noted whole as well, as a parsed one is: a request that repeats whole is found
        # whole, the cheaper lookup.
        whole = (
            dataclasses.replace(kept, endpoint=endpoint, path=path, query=query) if seen else None
        )
        _note(self.replays, data, whole)
        return True

    def _replay(self, parsed: _Parsed, endpoint: CheckEndpoint, path: bytes, query: bytes) -> bool:
        """Answer a check request already parsed (`parsed`, with this endpoint and URL)
        without parsing it again; False to parse it after all (an app request still in flight
        on this connection, or an answer the cache cannot give)."""
        if (self.cycle is not None and not self.cycle.response_complete) or self.pipeline:
            return False
        answer = self._answer(
            endpoint,
            path,
            query,
            parsed.api_key,
            parsed.headers,
            parsed.http_version,
            parsed.keep_alive,
        )
        if answer is None:
            return False
        if self.head_bytes is not None:
            # The connection's first request: it is between requests now, as after a parsed
            # one. The header timeout armed when it opened is for a head that never ends, and
            # would cut off a connection answered by replays alone.
            self.head_bytes = None
            self._cancel_head_timer()
        self.transport.write(answer)
        self.server_state.total_requests += 1
        if not parsed.keep_alive:
            self.transport.close()
        return True

    def _log_access(
        self, method: str, path: str, http_version: str, status: int, seconds: float
    ) -> None:
        # Never the query string: download URLs carry their signature there.
        access_logger.info(
            '%s "%s %s HTTP/%s" %d %.3fms',
            self.client[0] if self.client else "-",
            method,
            path,
            http_version,
            status,
            seconds * 1000,
        )

    # Everything else: the app, with files sent by the server

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        extensions: dict[str, Any] = dict(cycle.scope.get("extensions") or {})
        extensions.update(_SENDFILE_EXTENSIONS)
        cycle.scope["extensions"] = extensions
        with_files: Any = _FileSending(app, cycle, self)
        super()._start_asgi_task(cycle, with_files)


class _FileSending:
    """The app, with `pathsend` and `zerocopysend` messages sent by the server (and the access
    log line written once the response is complete)."""

    def __init__(self, app: ASGIApp, cycle: RequestResponseCycle, protocol: OTAHttpProtocol):
        self.app = app
        self.cycle = cycle
        self.protocol = protocol
        self.status = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        logged = False

        def log() -> None:
            # Before the response's last bytes go out: once a client has its answer, the
            # line is already written.
            nonlocal logged
            if self.protocol.access_log and self.status and not logged:
                logged = True
                self.protocol._log_access(
                    scope["method"],
                    scope["raw_path"].decode("latin-1"),
                    scope["http_version"],
                    self.status,
                    time.perf_counter() - started,
                )

        async def send_files(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                self.status = message["status"]
                await send(message)
            elif kind == "http.response.pathsend":
                log()
                with open(message["path"], "rb") as file:
                    await self._send_file(send, file, 0, None, more_body=False)
            elif kind == "http.response.zerocopysend":
                more_body = message.get("more_body", False)
                if not more_body:
                    log()
                await self._send_file(
                    send,
                    message["file"],
                    message.get("offset"),
                    message.get("count"),
                    more_body=more_body,
                )
            else:
                if kind == "http.response.body" and not message.get("more_body", False):
                    log()
                await send(message)

        try:
            await self.app(scope, receive, send_files)
        finally:
            log()

    async def _send_file(
        self, send: Send, file: BinaryIO, offset: int | None, count: int | None, *, more_body: bool
    ) -> None:
        cycle = self.cycle
        if cycle.disconnected:
            # The client left, perhaps before the response could start (uvicorn then drops
            # `http.response.start` without a word): nothing to send, nothing to complain of.
            return
        if not cycle.response_started or cycle.response_complete:
            raise RuntimeError("a file can only be sent within a started response")
        if cycle.scope["method"] != "HEAD" and not cycle.disconnected:
            if cycle.chunked_encoding:
                await self._send_in_chunks(send, file, offset or 0, count)
            else:
                if cycle.flow.write_paused:
                    await cycle.flow.drain()
                try:
                    sent = await self._sendfile(cycle.transport, file, offset or 0, count)
                except (ConnectionError, OSError, RuntimeError):
                    # The client went away (or the transport closed) mid-file.
                    cycle.disconnected = True
                    cycle.transport.close()
                    return
                cycle.expected_content_length -= sent
        await send({"type": "http.response.body", "body": b"", "more_body": more_body})

    async def _sendfile(
        self, transport: asyncio.Transport, file: BinaryIO, offset: int, count: int | None
    ) -> int:
        """The loop's `sendfile`, after one direct sendfile(2) when nothing is queued before
        it: a megabyte range usually fits the socket at once, and the loop's way (pausing
        reading, waiting for the buffer to empty, futures, a writer callback) cost more than
        the rest of such a download's Python work."""
        sent = 0
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_write_buffer_size() == 0 and count != 0:
            size = count if count is not None else os.fstat(file.fileno()).st_size - offset
            try:
                sent = os.sendfile(sock.fileno(), file.fileno(), offset, size)
            except BlockingIOError:
                sent = 0
            if sent == size:
                return sent
            count = size - sent
        return sent + await self.protocol.loop.sendfile(transport, file, offset + sent, count)

    async def _send_in_chunks(
        self, send: Send, file: BinaryIO, offset: int, count: int | None
    ) -> None:
        file.seek(offset)
        left = count
        while left is None or left > 0:
            size = _CHUNK if left is None else min(_CHUNK, left)
            chunk = await asyncio.to_thread(file.read, size)
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})


def uvicorn_options() -> dict[str, Any]:
    """What `serve` and the test servers pass to uvicorn alike."""
    return {
        "http": OTAHttpProtocol,
        # The standard loop: its transports can sendfile(2); uvloop's cannot.
        "loop": "asyncio",
        "lifespan": "on",
        # The app alone decides on X-Forwarded-For (KOOLBASE_OTA_TRUSTED_PROXIES).
        "proxy_headers": False,
        "server_header": False,
        "access_log": False,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "ws": "none",
    }
