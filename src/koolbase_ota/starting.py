"""What `serve` answers before its workers start: it listens from its first moment.

`serve` gets the database ready before its workers start: it migrates it, and on PostgreSQL
waits for up to `KOOLBASE_OTA_DATABASE_START_WAIT_SECONDS` for it to accept connections. It did
not listen meanwhile, so a Kubernetes liveness probe failed and had it killed while it waited,
and clients and load balancers saw connections refused. Now `serve` binds its addresses first
(`listening_sockets`: a port in use is one error line before anything is written), and
`Responder` answers on them from a thread of its own: `/healthz` 200 (the process is alive),
`/readyz` 503 (not ready), anything else 503 with the code `starting` and a `Retry-After`
(the SDKs take any answer but 200 as "no update"), each on a connection it then closes. When
the database is ready, the responder stops accepting, answers what it accepted, and the
workers are given the same sockets: connections waiting in their queues are answered by
them, not refused."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import re
import select
import socket
import threading
from collections.abc import Callable, Mapping

from koolbase_ota.security import check_headers

#: Connections the kernel queues for each listening socket (uvicorn's default).
BACKLOG = 2048
#: Connections the responder holds at once (a quarter of the open-file limit where that is
#: less); at the bound it stops accepting until one is closed, and the others wait in the
#: queue. Every connection is an open file, and the database's own connections need some
#: too: a client holding a thousand open made `serve` run out of files and give up on its
#: database (found by review).
MAX_CONVERSATIONS = 256
#: A request head must arrive within this long, and fit in this many bytes.
HEAD_TIMEOUT_SECONDS = 5.0
MAX_HEAD_BYTES = 16 * 1024
#: What a client is told to wait before it tries again.
RETRY_AFTER_SECONDS = 5
#: While the responder answers, a connection is accepted once it has sent something, or has
#: been open this long.
DEFER_ACCEPT_SECONDS = 300
#: At the bound, a connection still reading its head after this long is closed for the next
#: (looked at this often).
EVICT_AFTER_SECONDS = 0.5
ROOM_POLL_SECONDS = 0.1
#: How long after a failed accept (out of files) the responder accepts again.
ACCEPT_RETRY_SECONDS = 0.1
#: How long connections taken may go on once the responder stops (to be read and answered).
FINISH_SECONDS = 2.0
#: After an answer, what the client still sends (a body not read) is read and dropped for at
#: most this long and this many bytes before the connection is closed: closing with unread
#: bytes resets it, and the client may lose the answer.
LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """TCP sockets bound to `host:port` and listening, which worker processes can inherit.

    One for each address the host resolves to, as asyncio (and so uvicorn's one worker)
    binds: `localhost` is 127.0.0.1 and ::1, an empty host every address of both families;
    of several, one of a family the system lacks (no IPv6) is left out. An IPv6 socket beside
    an IPv4 one takes IPv6 only; alone (`::`), it takes IPv4 too where the system allows.
    `SO_REUSEADDR`, so a restart does not wait for the last run's connections to time out.
    Raises OSError (a port in use, a name that does not resolve).
    """
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in found))
    sockets: list[socket.socket] = []
    missing: list[OSError] = []
    try:
        for family, address in addresses:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                missing.append(exc)  # no IPv6 in this kernel
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and len(addresses) > 1:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL or len(addresses) == 1:
                    raise
                missing.append(exc)  # IPv6 turned off: ::1 is nowhere
                sockets.pop().close()
                continue
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
        if not sockets:
            raise missing[0]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _defer_accept(sock: socket.socket, seconds: int) -> None:
    """Linux's `TCP_DEFER_ACCEPT`: a connection is accepted once it has sent something (0:
    at once, the default). Elsewhere nothing."""
    if hasattr(socket, "TCP_DEFER_ACCEPT"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, seconds)


def _room() -> int:
    """Connections the responder holds at most: `MAX_CONVERSATIONS`, or a quarter of the
    open files this process may have where that is less."""
    try:
        import resource
    except ImportError:  # not on Windows
        return MAX_CONVERSATIONS
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONVERSATIONS
    return max(4, min(MAX_CONVERSATIONS, soft // 4))


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


def answer_for(request_line: bytes) -> bytes:
    """The whole answer to a request, by its request line."""
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        error = {"error": "malformed HTTP request", "code": "bad_request"}
        return _answer(400, "Bad Request", error, head_only=False)
    method, target = parts[0], parts[1]
    if target[:8].lower().startswith((b"http://", b"https://")):  # a proxy's absolute form
        authority_on = target[target.index(b"//") + 2 :]
        after_host = re.search(rb"[/?#]", authority_on)
        rest = authority_on[after_host.start() :] if after_host else b""
        target = rest if rest.startswith(b"/") else b"/" + rest
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


class _HeadTooLarge(Exception):
    pass


async def _request_line(reader: asyncio.StreamReader) -> bytes:
    """The request line, once the whole head is read: lines ending in CRLF or a bare LF, up to
    an empty one (empty lines before the request line are skipped, as RFC 9112 allows)."""
    request_line: bytes | None = None
    size = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _HeadTooLarge from None
        size += len(line)
        if size > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        if request_line is None:
            request_line = line or None
        elif not line:
            return request_line


async def _answer_to(reader: asyncio.StreamReader) -> bytes:
    """The answer to the request head `reader` gives, once read whole."""
    try:
        async with asyncio.timeout(HEAD_TIMEOUT_SECONDS):
            return answer_for(await _request_line(reader))
    except _HeadTooLarge:
        too_large = {
            "error": f"request headers too large (at most {MAX_HEAD_BYTES} bytes)",
            "code": "headers_too_large",
        }
        return _answer(431, "Request Header Fields Too Large", too_large, head_only=False)


async def _send(writer: asyncio.StreamWriter, answer: bytes) -> None:
    writer.write(answer)
    await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT_SECONDS)
    if writer.can_write_eof():
        writer.write_eof()


async def _linger(reader: asyncio.StreamReader) -> None:
    """Read and drop what the client still sends, for a while, before the connection closes."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            dropped = 0
            while dropped < LINGER_BYTES and (piece := await reader.read(64 * 1024)):
                dropped += len(piece)


def _closing_if_cancelled(connection: socket.socket) -> Callable[[asyncio.Task[None]], None]:
    """A task cancelled before it ran never closed its connection: this closes it."""

    def close(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            connection.close()

    return close


class Responder:
    """Answers on listening sockets from a thread of its own, from `start` until `stop`.

    It accepts while fewer than `MAX_CONVERSATIONS` connections wait for their answer; the
    others wait in the sockets' queues. Stopping leaves the sockets open and listening, with
    the connections not accepted yet queued on them, for whoever serves next.
    """

    def __init__(self, sockets: list[socket.socket]) -> None:
        self._sockets = sockets
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="koolbase-starting", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def stop(self) -> None:
        """Stop accepting; connections accepted get `FINISH_SECONDS` to be answered."""
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
        loop = self._loop = asyncio.get_running_loop()
        stopping = self._stopping = asyncio.Event()
        conversations: set[asyncio.Task[None]] = set()
        #: Those still reading their head, oldest first.
        reading: dict[asyncio.Task[None], float] = {}
        room_timer: asyncio.TimerHandle | None = None
        room = _room()  # connections held at most: `conversations` while they last
        accepting = stopped = False

        # Accepting is synchronous, from the sockets' readiness: an accepted connection is a
        # task at once (a coroutine awaiting `sock_accept` lost the connection it had just
        # accepted when it was cancelled, and the socket stayed open).
        def resume() -> None:
            nonlocal accepting
            if not accepting and not stopped and len(conversations) < room:
                accepting = True
                for sock in self._sockets:
                    loop.add_reader(sock.fileno(), take, sock)

        def pause() -> None:
            nonlocal accepting
            if accepting:
                accepting = False
                for sock in self._sockets:
                    loop.remove_reader(sock.fileno())

        def take(listener: socket.socket) -> None:
            while len(conversations) < room:
                try:
                    connection, _peer = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    return
                except OSError:
                    # Out of files: the queue waits (as asyncio's own servers retry, sooner).
                    pause()
                    loop.call_later(ACCEPT_RETRY_SECONDS, resume)
                    return
                task = loop.create_task(converse(connection))
                conversations.add(task)
                task.add_done_callback(ended)
                task.add_done_callback(_closing_if_cancelled(connection))
            pause()  # the rest wait in the queues
            if room_timer is None:
                make_room()

        def make_room() -> None:
            """At the bound, looked at every `ROOM_POLL_SECONDS` while a connection still reads
            its head: when another waits in a queue, the one that has waited longest for the
            rest of its head, at least `EVICT_AFTER_SECONDS`, is closed for it. One client
            sending heads a byte at a time held every place for 5 s each, and kept a liveness
            probe in the queue for a minute (found by review, helper-47)."""
            nonlocal room_timer
            room_timer = None
            if stopped or len(conversations) < room or not reading:
                return  # places come back as answered connections end
            oldest, since = next(iter(reading.items()))
            # (select() takes these: the listening sockets are among the first files opened.)
            if (
                loop.time() - since >= EVICT_AFTER_SECONDS
                and select.select(self._sockets, [], [], 0)[0]
            ):
                del reading[oldest]
                oldest.cancel()  # its place comes back as it ends, and the next is accepted
                return
            room_timer = loop.call_later(ROOM_POLL_SECONDS, make_room)

        def ended(task: asyncio.Task[None]) -> None:
            conversations.discard(task)
            resume()  # its place is free

        async def converse(connection: socket.socket) -> None:
            """Answer one request and close the connection."""
            this = asyncio.current_task()
            assert this is not None
            reading[this] = loop.time()
            answered = False
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await asyncio.open_connection(
                    sock=connection, limit=MAX_HEAD_BYTES
                )
                answer = await _answer_to(reader)
                reading.pop(this, None)
                await _send(writer, answer)
                answered = True
                await _linger(reader)
            except (OSError, asyncio.IncompleteReadError):
                pass  # a client that sent nothing whole in time, or went away (timeouts too)
            except asyncio.CancelledError:
                pass  # closed for a connection waiting, or the responder stopped
            finally:
                reading.pop(this, None)
                if writer is None:
                    connection.close()
                elif answered:
                    writer.close()  # its answer sent: closed once it is out
                else:
                    writer.transport.abort()  # nothing to wait for

        for sock in self._sockets:
            sock.setblocking(False)
            # A connection opened ahead of its request (a client's pool) stays in the queue
            # until it sends one, then goes to whoever serves by then; and takes no room.
            _defer_accept(sock, DEFER_ACCEPT_SECONDS)
        resume()
        self._started.set()
        try:
            await stopping.wait()
        finally:
            stopped = True
            pause()
            for sock in self._sockets:
                _defer_accept(sock, 0)  # the workers accept as they always did
            if conversations:
                await asyncio.wait(set(conversations), timeout=FINISH_SECONDS)
            for task in set(conversations):
                task.cancel()
            if conversations:
                await asyncio.wait(set(conversations))
            await asyncio.sleep(0)  # the transports closed above let go of their sockets
