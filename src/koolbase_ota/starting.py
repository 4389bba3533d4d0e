"""What `serve` answers before its workers start: it listens from its first moment.

`serve` gets the database ready before its workers start: it migrates it, and on PostgreSQL
waits for up to `KOOLBASE_OTA_DATABASE_START_WAIT_SECONDS` for it to accept connections. It did
not listen meanwhile, so a Kubernetes liveness probe failed and had it killed while it waited,
and clients and load balancers saw connections refused. Now `serve` binds its address first
(`listening_socket`: a port in use is one error line before the database is touched), and
`Responder` answers on it from a thread of its own: `/healthz` 200 (the process is alive),
`/readyz` 503 (not ready), anything else 503 with the code `starting` and a `Retry-After`
(the SDKs take any answer but 200 as "no update"), each on a connection it then closes. When
the database is ready, the responder stops taking connections and the workers are given the
same socket: connections waiting in its queue are answered by them, not refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Mapping

from koolbase_ota.security import check_headers

#: Connections the kernel queues for the listening socket (uvicorn's default).
BACKLOG = 2048
#: A request head must arrive within this long, and fit in this many bytes.
HEAD_TIMEOUT_SECONDS = 5.0
MAX_HEAD_BYTES = 16 * 1024
#: What a client is told to wait before it tries again.
RETRY_AFTER_SECONDS = 5
#: How long answers under way may take to finish once the responder stops.
FINISH_SECONDS = 2.0
#: After an answer, what the client still sends (a body not read) is read and dropped for at
#: most this long and this many bytes before the connection is closed: closing with unread
#: bytes resets it, and the client may lose the answer.
LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` and listening, which worker processes can inherit.

    As uvicorn binds for several workers: IPv6 when the host has a colon (`::` then takes
    IPv4 too where the system allows), else IPv4; `SO_REUSEADDR`, so a restart does not wait
    for the last run's connections to time out. Raises OSError (a port in use, a name that
    does not resolve).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _answer(status: int, reason: str, body: Mapping[str, object], *, head_only: bool) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(payload)),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
        *check_headers(),
    ]
    if status == 503:
        headers.append((b"retry-after", b"%d" % RETRY_AFTER_SECONDS))
    lines = [b"HTTP/1.1 %d %s" % (status, reason.encode())]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else payload)


def answer_for(head: bytes) -> bytes:
    """The whole answer to a request head (request line and headers, without the blank line)."""
    request_line = head.split(b"\r\n", 1)[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        error = {"error": "malformed HTTP request", "code": "bad_request"}
        return _answer(400, "Bad Request", error, head_only=False)
    method, target = parts[0], parts[1]
    path = target.split(b"?", 1)[0]
    head_only = method == b"HEAD"
    if path == b"/healthz":
        return _answer(200, "OK", {"status": "ok"}, head_only=head_only)
    if path == b"/readyz":
        readiness = {"status": "starting", "checks": {"database": "starting"}}
        return _answer(503, "Service Unavailable", readiness, head_only=head_only)
    starting = {
        "error": "the server is starting: its database is not ready yet; try again",
        "code": "starting",
    }
    return _answer(503, "Service Unavailable", starting, head_only=head_only)


async def _converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one request head, answer it, and close the connection."""
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_SECONDS)
        except asyncio.LimitOverrunError:
            too_large = {
                "error": f"request headers too large (at most {MAX_HEAD_BYTES} bytes)",
                "code": "headers_too_large",
            }
            answer = _answer(431, "Request Header Fields Too Large", too_large, head_only=False)
        else:
            answer = answer_for(head[:-4])
        writer.write(answer)
        await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT_SECONDS)
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_SECONDS):
                dropped = 0
                while dropped < LINGER_BYTES and (piece := await reader.read(64 * 1024)):
                    dropped += len(piece)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        pass  # a client that sent nothing whole in time, or went away: nothing to answer
    finally:
        writer.close()


class Responder:
    """Answers on a listening socket from a thread of its own, from `start` until `stop`.

    It accepts on a duplicate of the socket, so that stopping closes the duplicate only: the
    socket itself stays open and listening for whoever serves next.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="koolbase-starting", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def stop(self) -> None:
        """Stop taking connections; answers under way get `FINISH_SECONDS` to finish."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # its loop ended already
                loop.call_soon_threadsafe(stopping.set)
        self._thread.join()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._started.set()  # also when it could not start: `start` must not hang

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        stopping = self._stopping = asyncio.Event()
        conversations: set[asyncio.Task[None]] = set()

        async def converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            conversations.add(task)
            try:
                await _converse(reader, writer)
            finally:
                conversations.discard(task)

        server = await asyncio.start_server(
            converse, sock=self._sock.dup(), limit=MAX_HEAD_BYTES, backlog=BACKLOG
        )
        self._started.set()
        try:
            await stopping.wait()
        finally:
            server.close()  # no more accepts; closes the duplicate, not the socket
            if conversations:
                await asyncio.wait(set(conversations), timeout=FINISH_SECONDS)
            for task in list(conversations):
                task.cancel()
            if conversations:
                await asyncio.wait(set(conversations))
