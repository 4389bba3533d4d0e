"""`serve` listens from its first moment: what it answers while the database gets ready, and
how it hands its socket to the workers (`koolbase_ota.starting`)."""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from koolbase_ota import starting
from tests.conftest import assert_error, eventually
from tests.services import PostgresService
from tests.test_cli import cli_env, run_cli
from tests.test_e2e import launch, stop, wait_until_answering

CHECK_PATH = "/v1/sdk/ota/check"


@contextlib.contextmanager
def responding() -> Iterator[tuple[socket.socket, starting.Responder, str]]:
    """A listening socket on a free port of 127.0.0.1 with a responder answering on it."""
    (sock,) = starting.listening_sockets("127.0.0.1", 0)
    responder = starting.Responder([sock])
    responder.start()
    try:
        yield sock, responder, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        responder.stop()
        sock.close()


def exchange(sock_address: tuple[str, int], data: bytes) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    with socket.create_connection(sock_address, timeout=10) as client:
        client.sendall(data)
        answer = b""
        while piece := client.recv(65536):
            answer += piece
        return answer


def test_health_and_readiness_while_starting() -> None:
    """A liveness probe passes (the process is alive and getting ready), a readiness probe
    does not, and every other request is a JSON 503 the SDKs take as "no update"."""
    with responding() as (_sock, _responder, base_url):
        alive = httpx.get(base_url + "/healthz")
        ready = httpx.get(base_url + "/readyz")
        check = httpx.get(base_url + CHECK_PATH + "?current_version=1", headers={"x-api-key": "k"})
        upload = httpx.post(base_url + "/v1/bundles", content=b"x" * 100_000)
        probed = httpx.head(base_url + "/readyz")
    assert alive.status_code == 200
    assert alive.json() == {"status": "ok"}
    assert ready.status_code == 503
    assert ready.json() == {"status": "starting", "checks": {"database": "starting"}}
    for answer in (check, upload):
        assert_error(answer, 503, "starting")
        assert answer.headers["retry-after"] == "5"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["connection"] == "close"
    assert probed.status_code == 503
    assert probed.content == b""
    assert int(probed.headers["content-length"]) == len(ready.content)


def test_a_malformed_or_oversized_head_is_a_json_error() -> None:
    with responding() as (sock, _responder, _base_url):
        address = sock.getsockname()
        malformed = exchange(address, b"garbage\r\n\r\n")
        huge = exchange(address, b"GET / HTTP/1.1\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert malformed.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert malformed.endswith(b'{"error":"malformed HTTP request","code":"bad_request"}')
    assert huge.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b'"code":"headers_too_large"' in huge


def test_a_client_that_sends_no_head_in_time_is_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(starting, "HEAD_TIMEOUT_SECONDS", 0.5)
    with (
        responding() as (sock, _responder, _base_url),
        socket.create_connection(sock.getsockname(), timeout=10) as client,
    ):
        client.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        assert client.recv(100) == b""  # closed, with no answer


def test_stopping_leaves_the_socket_listening_with_its_queue_for_the_next_owner() -> None:
    """Connections made after the responder stopped wait in the socket's queue and are
    answered by whoever serves next (the workers), not refused; a request under way when it
    stops is answered."""
    with responding() as (sock, responder, _base_url):
        address = sock.getsockname()
        under_way = socket.create_connection(address, timeout=10)
        under_way.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.2)  # accepted, its head not whole yet
        stopping = threading.Thread(target=responder.stop)
        stopping.start()
        time.sleep(0.2)
        under_way.sendall(b"host: x\r\n\r\n")
        stopping.join(timeout=10)
        assert not stopping.is_alive()
        with under_way:
            assert under_way.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        # Stopped: a new connection is queued, not answered by the responder...
        waiting = socket.create_connection(address, timeout=10)
        waiting.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(100)
        # ...and the next owner of the socket takes it from the queue.
        sock.setblocking(True)
        accepted, _peer = sock.accept()
        with accepted, waiting:
            assert accepted.recv(100) == b"GET /healthz HTTP/1.1\r\n\r\n"
            accepted.sendall(b"next")
            waiting.settimeout(10)
            assert waiting.recv(100) == b"next"


def test_a_connection_opened_ahead_of_its_request_goes_to_the_next_owner() -> None:
    """A client's pool opens connections before it has requests: one the responder accepted
    idle was closed unanswered at the handover, and took room meanwhile (found by review,
    helper-46). It is now accepted once it sends something (`TCP_DEFER_ACCEPT`, on Linux)."""
    if not hasattr(socket, "TCP_DEFER_ACCEPT"):
        pytest.skip("Linux only")
    with responding() as (sock, responder, _base_url):
        address = sock.getsockname()
        early = socket.create_connection(address, timeout=10)
        time.sleep(0.3)
        responder.stop()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
        with early:
            early.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            sock.setblocking(True)
            sock.settimeout(10)
            accepted, _peer = sock.accept()
            with accepted:
                assert accepted.recv(100) == b"GET /healthz HTTP/1.1\r\n\r\n"
                accepted.sendall(b"next")
                assert early.recv(100) == b"next"


def test_heads_of_every_form_are_answered() -> None:
    """A bare LF for CRLF, a proxy's absolute-form target, `OPTIONS *` and empty lines before
    the request line were a timeout or a 400 (found by review, helper-46)."""
    with responding() as (sock, _responder, _base_url):
        address = sock.getsockname()
        bare_lf = exchange(address, b"GET /healthz HTTP/1.1\nhost: x\n\n")
        absolute = exchange(address, b"GET HTTP://h:1/healthz?x=1 HTTP/1.1\r\nhost: h\r\n\r\n")
        query_only = exchange(address, b"GET http://h?a=/healthz HTTP/1.1\r\n\r\n")
        asterisk = exchange(address, b"OPTIONS * HTTP/1.1\r\nhost: h\r\n\r\n")
        leading = exchange(address, b"\r\nGET /readyz HTTP/1.1\r\n\r\n")
    assert bare_lf.startswith(b"HTTP/1.1 200 OK\r\n")
    assert absolute.startswith(b"HTTP/1.1 200 OK\r\n")
    assert query_only.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")  # its path is /
    assert asterisk.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b'"code":"starting"' in asterisk
    assert leading.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert leading.endswith(b'{"status":"starting","checks":{"database":"starting"}}')


def test_the_room_is_a_quarter_of_the_open_file_limit_where_that_is_less() -> None:
    """With a low limit (a container's 64), a few dozen held connections left the database no
    file to connect with (found by review, helper-46)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = (
        "import resource; from koolbase_ota import starting;"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (64, {hard}));"
        "print(starting._room())"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert shown.stdout == "16\n"
    assert starting._room() == min(starting.MAX_CONVERSATIONS, max(4, _soft // 4))


def test_an_address_the_system_lacks_is_left_out_beside_one_it_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where IPv6 is turned off, `localhost` still resolves to ::1 in many images: binding it
    failed the start (found by review, helper-46). The resolution is made up here (IPv6 is
    on); the bind failing is real: ::2 is no address of this machine."""
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists():
        pytest.skip("no IPv6 here")
    with pytest.raises(OSError, match="assign requested address"):
        starting.listening_sockets("::2", 0)  # alone, it is an error
    resolve = socket.getaddrinfo

    def both(host: str | None, port: int, **options: object) -> list[Any]:
        assert host == "both"
        return [
            *resolve("127.0.0.1", port, **options),  # type: ignore[arg-type]
            *resolve("::2", port, **options),  # type: ignore[arg-type]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    (only,) = starting.listening_sockets("both", 0)
    with only:
        assert only.getsockname()[0] == "127.0.0.1"


def test_every_connection_taken_as_it_stops_is_answered_or_left_queued() -> None:
    """Connections accepted but not yet read when it stopped (tasks not started) were
    dropped without an answer (found by review, helper-45)."""
    (sock,) = starting.listening_sockets("127.0.0.1", 0)
    responder = starting.Responder([sock])
    responder.start()
    address = sock.getsockname()
    clients: list[socket.socket] = []
    lock = threading.Lock()
    go = threading.Event()

    def connect_many() -> None:
        go.wait()
        for _ in range(40):
            client = socket.create_connection(address, timeout=10)
            client.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            with lock:
                clients.append(client)

    threads = [threading.Thread(target=connect_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    go.set()
    time.sleep(0.01)
    responder.stop()
    for thread in threads:
        thread.join()
    # The next owner answers what is queued.
    sock.setblocking(False)
    with sock:
        while True:
            try:
                accepted, _peer = sock.accept()
            except BlockingIOError:
                break
            with accepted:
                accepted.setblocking(True)
                accepted.recv(1000)
                accepted.sendall(b"next")
    answers = []
    for client in clients:
        with client:
            answer = b""
            while piece := client.recv(65536):
                answer += piece
            answers.append(answer)
    assert len(answers) == 320
    by_responder = [a for a in answers if a.startswith(b"HTTP/1.1 200 OK\r\n")]
    by_next = [a for a in answers if a == b"next"]
    assert len(by_responder) + len(by_next) == 320, {a[:30] for a in answers}


def test_stopping_with_connections_open_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """asyncio 3.11 logs a stream server's cancelled task as an error with a traceback: one
    for every connection open at the handover (found by review, helper-45)."""
    with (
        caplog.at_level(logging.WARNING),
        responding() as (sock, responder, _base_url),
        socket.create_connection(sock.getsockname(), timeout=10) as partial,
        socket.create_connection(sock.getsockname(), timeout=10) as answered,
    ):
        partial.sendall(b"GET /healthz HTTP/1.1\r\n")  # never the rest
        answered.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")  # and never closed
        time.sleep(0.3)
        began = time.monotonic()
        responder.stop()
        assert time.monotonic() - began < starting.FINISH_SECONDS + 2
        assert partial.recv(100) == b""
        assert answered.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_at_the_bound_the_oldest_unfinished_head_makes_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each connection held is an open file: a client holding a thousand open made `serve`
    run out of them and fail to connect to its database (found by review, helper-45). At the
    bound, the connection that has waited longest for the rest of its head is closed for the
    next: a client sending heads a byte at a time kept a liveness probe in the queue for a
    minute (helper-47)."""
    monkeypatch.setattr(starting, "MAX_CONVERSATIONS", 4)
    with responding() as (sock, _responder, _base_url):
        address = sock.getsockname()
        held = []
        for _ in range(4):
            client = socket.create_connection(address, timeout=10)
            client.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
            held.append(client)
            time.sleep(0.1)
        probe = exchange(address, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert probe.startswith(b"HTTP/1.1 200 OK\r\n")
        oldest, *others = held
        with contextlib.suppress(ConnectionResetError):
            assert oldest.recv(100) == b""  # closed for the probe
        for client in others:
            client.settimeout(0.2)
            with pytest.raises(TimeoutError):
                client.recv(100)  # still waiting for their heads
        for client in held:
            client.close()


def test_at_the_bound_with_every_place_answered_the_next_waits_in_the_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(starting, "MAX_CONVERSATIONS", 4)
    monkeypatch.setattr(starting, "LINGER_SECONDS", 3.0)
    with responding() as (sock, _responder, _base_url):
        address = sock.getsockname()
        held = [socket.create_connection(address, timeout=10) for _ in range(4)]
        for client in held:
            client.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")  # answered, never closed
            assert client.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")
        with socket.create_connection(address, timeout=10) as over:
            over.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            over.settimeout(0.5)
            with pytest.raises(TimeoutError):
                over.recv(100)  # queued, not refused, while four answered ones linger
            over.settimeout(10)
            assert over.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")
        for client in held:
            client.close()


def test_sockets_for_each_address_of_the_host() -> None:
    """As asyncio (uvicorn's one worker) bound: an empty host is every address of both
    families, `::` alone takes IPv4 too (where the system lets it)."""
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists():
        pytest.skip("no IPv6 here")
    everywhere = starting.listening_sockets("", 0)
    try:
        families = sorted(sock.family for sock in everywhere)
        assert families == [socket.AF_INET, socket.AF_INET6]
        (ipv6,) = (sock for sock in everywhere if sock.family == socket.AF_INET6)
        assert ipv6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for sock in everywhere:
            sock.close()
    (alone,) = starting.listening_sockets("::", 0)
    with alone:
        default = int(Path("/proc/sys/net/ipv6/bindv6only").read_text())
        assert alone.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == default


def test_a_port_in_use_is_one_error_line_before_the_database_is_touched(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use") as raised:
            starting.listening_sockets("127.0.0.1", port)
        assert raised.value.errno == errno.EADDRINUSE
        data_dir = tmp_path / "data"
        result = run_cli(
            data_dir, "serve", "--host", "127.0.0.1", "--port", str(port), env=cli_env(data_dir)
        )
    assert result.returncode == 1
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert not data_dir.exists()  # no data dir, key or database made


def test_serve_answers_while_it_waits_for_its_database_then_serves(tmp_path: Path) -> None:
    """A liveness probe killed `serve` while it waited for its database (it did not listen):
    now `/healthz` is 200 from its first moment, `/readyz` and the checks 503 until the
    database is ready, then the workers answer on the same port."""
    with PostgresService() as late:
        url = late.create_database()
        late.stop()
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        server = launch(
            tmp_path / "data",
            "starting",
            "--workers",
            "2",
            env={"KOOLBASE_OTA_DATABASE_URL": url},
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        )
        try:
            eventually(lambda: "trying again" in server.log(), "the first failure", within=30)
            # Its connections count against the open-file limit from the start: raised first.
            limits = Path(f"/proc/{server.process.pid}/limits").read_text()
            (line,) = (row for row in limits.splitlines() if row.startswith("Max open files"))
            wanted = hard if hard != resource.RLIM_INFINITY else 65536
            assert line.split()[3] == str(wanted), line
            alive = httpx.get(server.base_url + "/healthz", timeout=10)
            ready = httpx.get(server.base_url + "/readyz", timeout=10)
            check = httpx.get(
                server.base_url + CHECK_PATH + "?current_version=0",
                headers={"x-api-key": "pk_live_0123456789abcdef01234567"},
                timeout=10,
            )
            assert alive.status_code == 200, server.log()
            assert ready.status_code == 503
            assert_error(check, 503, "starting")
            assert server.process.poll() is None, server.log()
            late.start()
            wait_until_answering(server)
            eventually(
                lambda: httpx.get(server.base_url + "/readyz", timeout=10).status_code == 200,
                "readiness",
                within=30,
            )
            key = server.credentials()["public_keys"]["production"]
            answer = httpx.get(
                server.base_url + CHECK_PATH + "?current_version=0",
                headers={"x-api-key": key},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"has_update": False}
        finally:
            stop(server.process)
