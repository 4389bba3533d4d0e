"""`serve` listens from its first moment: what it answers while the database gets ready, and
how it hands its socket to the workers (`koolbase_ota.starting`)."""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from koolbase_ota import starting
from tests.conftest import assert_error, eventually
from tests.services import PostgresService
from tests.test_cli import DB_FILE, cli_env, run_cli
from tests.test_e2e import launch, stop, wait_until_answering

CHECK_PATH = "/v1/sdk/ota/check"


@contextlib.contextmanager
def responding() -> Iterator[tuple[socket.socket, starting.Responder, str]]:
    """A listening socket on a free port of 127.0.0.1 with a responder answering on it."""
    sock = starting.listening_socket("127.0.0.1", 0)
    responder = starting.Responder(sock)
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


def test_a_port_in_use_is_one_error_line_before_the_database_is_touched(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use") as raised:
            starting.listening_socket("127.0.0.1", port)
        assert raised.value.errno == errno.EADDRINUSE
        data_dir = tmp_path / "data"
        result = run_cli(
            data_dir, "serve", "--host", "127.0.0.1", "--port", str(port), env=cli_env(data_dir)
        )
    assert result.returncode == 1
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert not (data_dir / DB_FILE).exists()


def test_serve_answers_while_it_waits_for_its_database_then_serves(tmp_path: Path) -> None:
    """A liveness probe killed `serve` while it waited for its database (it did not listen):
    now `/healthz` is 200 from its first moment, `/readyz` and the checks 503 until the
    database is ready, then the workers answer on the same port."""
    with PostgresService() as late:
        url = late.create_database()
        late.stop()
        server = launch(
            tmp_path / "data", "starting", "--workers", "2", env={"KOOLBASE_OTA_DATABASE_URL": url}
        )
        try:
            eventually(lambda: "trying again" in server.log(), "the first failure", within=30)
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
