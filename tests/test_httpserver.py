"""The HTTP server `serve` runs (`koolbase_ota.httpserver`), on real sockets.

Warm checks are answered inside the parser's callbacks, a cold one goes through the app, and
files go out with sendfile(2); each must answer exactly what the app would, and keep HTTP/1.1
(keep-alive, pipelining, bodies, bounds) intact around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from koolbase_ota.httpserver import (
    BODY_READ_BYTES,
    MAX_HEADERS,
    OTAHttpProtocol,
    heads_of,
    render_answer,
    replays_of,
)
from koolbase_ota.sdk.check import CHECK_PATH
from koolbase_ota.sdk.codepush import CODE_PUSH_PATH
from tests.api.test_upload import host_port
from tests.conftest import Project, RunningServer, make_zip, new_project, start_server, upload
from tests.test_hostile_requests import Answer, read_answer, send

#: The check's path with one letter percent-encoded: the same endpoint, but not the raw path
#: the fast path matches, so the app (its ASGI endpoint) answers it.
CHECK_THROUGH_APP = CHECK_PATH.replace("check", "%63heck")
IDLE_SECONDS = 1


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("httpserver"),
        uvicorn_overrides={"timeout_keep_alive": IDLE_SECONDS},
        check_rate_per_address=0,
    )
    yield running
    running.stop()


def published(server: RunningServer, bundle: bytes) -> tuple[Project, dict[str, Any]]:
    """A new project with `bundle` active on production, and its SDK check's answer."""
    project = new_project(server.db)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        uploaded = upload(client, project, bundle)
        assert uploaded.status_code == 201, uploaded.text
        activated = client.post(
            project.path(f"/bundles/{uploaded.json()['id']}/activate"), headers=project.auth
        )
        assert activated.status_code == 200, activated.text
        offer: dict[str, Any] = client.get(
            CHECK_PATH, headers={"x-api-key": project.keys["production"]}
        ).json()
    assert offer["has_update"] is True
    return project, offer


@pytest.fixture(scope="module")
def released_project(http_server: RunningServer) -> tuple[Project, dict[str, Any]]:
    """A project with an active 300 KiB bundle on production; its SDK check's answer."""
    return published(http_server, make_zip({"data.bin": os.urandom(300 * 1024)}))  # incompressible


@pytest.fixture(scope="module")
def large_release(http_server: RunningServer) -> tuple[Project, dict[str, Any], bytes]:
    """A project whose active bundle (6 MiB) is larger than any socket buffer here (4 MiB at
    most); its SDK check's answer, and the bundle."""
    bundle = make_zip({"data.bin": os.urandom(6 * 1024 * 1024)})
    return (*published(http_server, bundle), bundle)


def request(path: str, *, key: str | None = None, extra: str = "", version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: 127.0.0.1"]
    if key is not None:
        lines.append(f"x-api-key: {key}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def connect(server: RunningServer) -> socket.socket:
    return socket.create_connection(host_port(server), timeout=10)


def read_answers(sock: socket.socket, count: int) -> list[Answer]:
    """`count` answers in a row off one connection (pipelined: nothing read past is lost)."""
    data = b""
    answers: list[Answer] = []
    while len(answers) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(answers)} answers"
            data += chunk
            continue
        status_line, *lines = data[:head_end].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        end = head_end + 4 + int(headers.get("content-length", "0"))
        while len(data) < end:
            chunk = sock.recv(65536)
            assert chunk, f"closed inside answer {len(answers) + 1}"
            data += chunk
        answers.append(Answer(int(status_line.split()[1]), headers, data[head_end + 4 : end]))
        data = data[end:]
    return answers


def without_date(answer: Answer) -> dict[str, str]:
    return {name: value for name, value in answer.headers.items() if name != "date"}


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?channel=production&version=0",
        "?channel=production&version=999",
        "?channel=staging",
        "?version=abc",
        "?channel=nope",
        "?channel=production&app_version=1.2&platform=ios&device_id=d-1",
    ],
)
def test_a_warm_check_answers_as_the_app_does(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]], query: str
) -> None:
    project, _offer = released_project
    key = project.keys["production"]
    with connect(http_server) as sock:
        for _ in range(2):  # the first may be cold; the second is answered from the cache
            send(sock, request(CHECK_PATH + query, key=key))
            fast = read_answer(sock)
        send(sock, request(CHECK_THROUGH_APP + query, key=key))
        through_app = read_answer(sock)
    assert fast.status == through_app.status
    assert fast.body == through_app.body
    assert without_date(fast) == without_date(through_app)
    assert "date" in fast.headers


@pytest.mark.parametrize(
    "query",
    [
        "?channel=production&version=0",
        "?channel=production&version=999",
        "?channel=staging",
        "?version=abc",
        "?channel=production&app_version=1.2&platform=ios&device_id=d-1",
    ],
)
def test_a_check_that_never_repeats_is_read_without_the_parser(
    http_server: RunningServer,
    released_project: tuple[Project, dict[str, Any]],
    query: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind a proxy every check carries its own header (the device's address; here a
    request id): no read repeats, whole or in its head. A plain one is read by the server
    itself (`read_plain_get`), not httptools, and answered as the app answers it."""
    project, _offer = released_project
    key = project.keys["production"]

    def varied(path: str, n: int) -> bytes:
        return request(path + query, key=key, extra=f"X-Request-Id: {os.urandom(4).hex()}-{n}\r\n")

    with connect(http_server) as sock:
        send(sock, varied(CHECK_THROUGH_APP, 0))
        app = read_answer(sock)
        for n in range(2):  # the first may be cold
            send(sock, varied(CHECK_PATH, n))
            read_answer(sock)
    begun: list[OTAHttpProtocol] = []
    parse = OTAHttpProtocol.on_message_begin

    def counted(protocol: OTAHttpProtocol) -> None:
        begun.append(protocol)
        parse(protocol)

    # The parser takes its callbacks from a connection's protocol when the connection opens.
    monkeypatch.setattr(OTAHttpProtocol, "on_message_begin", counted)
    with connect(http_server) as sock:
        answers = []
        for n in range(5):
            send(sock, varied(CHECK_PATH, n))
            answers.append(read_answer(sock))
        send(sock, varied(CHECK_THROUGH_APP, 9))  # and the parser still reads the rest
        assert read_answer(sock).body == app.body
    assert len(begun) == 1
    for answer in answers:
        assert answer.status == app.status
        assert answer.body == app.body
        assert without_date(answer) == without_date(app)


def test_a_check_with_a_fragment_answers_as_without_it(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    """uvicorn leaves a fragment out of the query, and so the app did on a cold check; the
    inline path kept it, so a warm one answered 400 `invalid_version` (`0#frag`)."""
    project, offer = released_project
    key = project.keys["production"]
    with connect(http_server) as sock:
        for _ in range(3):
            send(sock, request(CHECK_PATH + "?channel=production&version=0#frag", key=key))
            answer = read_answer(sock)
            assert answer.status == 200, answer.body
            assert answer.json()["version"] == offer["version"]


@pytest.mark.parametrize(
    "key", ["pk_live_000000000000000000000000", None], ids=["unknown-key", "no-key"]
)
def test_a_refused_check_answers_as_the_app_does(
    http_server: RunningServer, key: str | None
) -> None:
    with connect(http_server) as sock:
        answers: list[Answer] = []
        for path in (CHECK_PATH, CHECK_PATH, CHECK_THROUGH_APP):
            send(sock, request(path, key=key))
            answers.append(read_answer(sock))
    assert {answer.status for answer in answers} == {401}
    assert len({answer.body for answer in answers}) == 1


def test_pipelined_requests_are_answered_in_order(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    project, offer = released_project
    key = project.keys["production"]
    burst = (
        request(CHECK_PATH, key=key)
        + request("/healthz")
        + request(CHECK_PATH + "?channel=staging", key=key)
        + request(offer["download_url"].removeprefix(http_server.base_url))
        + request(CHECK_PATH, key=key)
    )
    with connect(http_server) as sock:
        send(sock, burst)
        answers = read_answers(sock, 5)
    assert [answer.status for answer in answers] == [200] * 5
    assert answers[0].body == answers[4].body
    assert b'"has_update":true' in answers[0].body
    assert answers[1].body == b'{"status":"ok"}'
    assert answers[2].body == b'{"has_update":false}'
    assert answers[3].headers["content-type"] == "application/zip"
    assert len(answers[3].body) == int(answers[3].headers["content-length"])


def kept_for_replay(server: RunningServer, sock: socket.socket, raw: bytes) -> Answer:
    """Send `raw` until the server keeps it for replay (the first answers may be cold: a new
    project's change, polled meanwhile, drops what the first check cached); the last answer."""
    for _ in range(20):
        send(sock, raw)
        answer = read_answer(sock)
        if replays_of(server.app).get(raw) is not None:
            return answer
    raise AssertionError("the check was never kept for replay")


def test_a_repeated_check_is_answered_without_parsing_it_again(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    """A read that repeats a whole check request byte for byte is answered from what the
    parser made of it before, on any connection: the same answer a parsed one gets."""
    project, offer = released_project
    raw = request(CHECK_PATH + "?channel=production&version=0", key=project.keys["production"])
    with connect(http_server) as sock:
        parsed = kept_for_replay(http_server, sock, raw)
        send(sock, raw)
        replayed = read_answer(sock)
    with connect(http_server) as sock:
        send(sock, raw)
        elsewhere = read_answer(sock)
    for answer in (replayed, elsewhere):
        assert answer.status == 200
        assert answer.body == parsed.body
        assert without_date(answer) == without_date(parsed)
    assert replayed.json()["checksum"] == offer["checksum"]


def test_two_checks_in_one_read_are_both_answered_and_not_kept_as_one(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    project, _offer = released_project
    raw = request(CHECK_PATH + "?channel=staging", key=project.keys["production"])
    with connect(http_server) as sock:
        send(sock, raw + raw)
        answers = read_answers(sock, 2)
    assert [answer.body for answer in answers] == [b'{"has_update":false}'] * 2
    assert raw + raw not in replays_of(http_server.app)


@pytest.mark.parametrize("kept", ["whole", "head"])
def test_a_connection_answered_by_replays_alone_outlives_the_header_timeout(
    tmp_path: Path, kept: str
) -> None:
    """The header timeout is for a request head that never ends. A connection whose every
    request, from its first, is answered from a kept parse (whole, or its head under another
    device's request line) stays open past it."""
    server = start_server(tmp_path, header_timeout_seconds=1)
    try:
        project, _offer = published(server, make_zip({"config.json": b"{}"}))
        key = project.keys["production"]
        if kept == "whole":
            raw = request(CHECK_PATH, key=key)
            sent_until_kept(server, raw)

            def next_request(n: int) -> bytes:
                return raw

        else:
            with connect(server) as sock:
                kept_head(server, sock, key)

            def next_request(n: int) -> bytes:
                target = f"{CODE_PUSH_PATH}?channel=production&current_bundle=0&device_id=d-{n}"
                return request(target, key=key)

        with connect(server) as sock:
            started = time.monotonic()
            answered = 0
            while time.monotonic() - started < 2.5:
                send(sock, next_request(answered))
                answer = read_answer(sock)
                assert answer.status == 200, f"cut off after {answered} answers"
                answered += 1
                time.sleep(0.1)
    finally:
        server.stop()


#: The most asyncio reads from a socket at once (`selector_events`' `max_size`), and the
#: write buffer past which a transport asks its protocol to pause writing.
READ_BYTES = 256 * 1024
HIGH_WATER = 64 * 1024
FILL_SECONDS = 20


@pytest.fixture(scope="module")
def patient_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with the default keep-alive timeout: a client that stops reading for a
    while is not idle at once, as it is on `http_server`."""
    running = start_server(tmp_path_factory.mktemp("patient"))
    yield running
    running.stop()


def flood(
    server: RunningServer, raw: bytes, *, seconds: float, answers: int, fill: bool = False
) -> tuple[int, int]:
    """Send `raw` back to back on one connection for `seconds` without reading an answer,
    then read `answers` answers (more than the server held: reading resumed). The most
    requests the server held queued in a connection's pipeline and bytes in its write buffer
    meanwhile.

    `fill`: go on (up to FILL_SECONDS in all) until the write buffer has passed HIGH_WATER: on
    a loaded machine a second of answers may not fill the kernel's socket buffers first."""
    connections = server._server.server_state.connections
    most_queued = most_buffered = 0
    batch = raw * 100
    pending = b""
    sent = 0
    with connect(server) as sock:
        # Short: a send that blocks (the server is not reading) must not hold up the sampling,
        # or a whole flood could pass with one look, taken before the server had answered.
        sock.settimeout(0.05)
        began = time.monotonic()
        while (now := time.monotonic()) < began + seconds or (
            fill and most_buffered <= HIGH_WATER and now < began + FILL_SECONDS
        ):
            with contextlib.suppress(TimeoutError):  # the server is not reading
                pending = pending or batch
                taken = sock.send(pending)
                pending = pending[taken:]
                sent += taken
            for protocol in list(connections):
                assert isinstance(protocol, OTAHttpProtocol)
                most_queued = max(most_queued, len(protocol.pipeline))
                if protocol.transport is not None:
                    buffered = protocol.transport.get_write_buffer_size()
                    most_buffered = max(most_buffered, buffered)
        assert sent // len(raw) > answers
        sock.settimeout(30)
        received = bytearray()
        while received.count(b"HTTP/1.1 200 OK\r\n") < answers:
            chunk = sock.recv(1 << 20)
            assert chunk, "closed before the answers came"
            received += chunk
    return most_queued, most_buffered


def test_a_client_that_never_reads_is_not_read_past_one_read_of_answers(
    patient_server: RunningServer,
) -> None:
    """Checks answered inline do not wait for their answers to be sent: a client that sends
    them back to back and never reads had them buffered without end (150 MB in 5 s here).
    Once a connection's unsent answers pass the high-water mark, it is not read again until
    they drain: at most one read's answers past the mark."""
    project, _offer = published(patient_server, make_zip({"config.json": b"{}"}))
    raw = request(CHECK_PATH + "?channel=staging", key=project.keys["production"])
    with connect(patient_server) as sock:
        kept_for_replay(patient_server, sock, raw)  # warm: answered inline from the start
        send(sock, raw)
        answer_bytes = len(sock.recv(65536))
    per_read = READ_BYTES // len(raw) + 1
    most_queued, most_buffered = flood(
        patient_server, raw, seconds=1, answers=3 * per_read, fill=True
    )
    assert most_queued == 0
    assert HIGH_WATER < most_buffered <= HIGH_WATER + per_read * answer_bytes


def protocol_of(server: RunningServer, sock: socket.socket) -> OTAHttpProtocol:
    """The server's protocol of the connection `sock` is the client end of."""
    for _ in range(100):
        for protocol in list(server._server.server_state.connections):
            assert isinstance(protocol, OTAHttpProtocol)
            if protocol.client == sock.getsockname()[:2]:
                return protocol
        time.sleep(0.01)
    raise AssertionError("no such connection")


def test_a_response_that_ends_past_the_high_water_mark_does_not_let_answers_pile_up(
    patient_server: RunningServer,
) -> None:
    """When the app's response is what fills the write buffer, the end of that response
    resumed reading although its bytes had not drained: checks sent after it, never read,
    were then answered inline and buffered without end. Reading resumes only as the buffer
    drains."""
    project, _offer = published(patient_server, make_zip({"config.json": b"{}"}))
    raw = request(CHECK_PATH + "?channel=staging", key=project.keys["production"])
    sent_until_kept(patient_server, raw)  # warm: answered inline from the start
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(host_port(patient_server))
        protocol = protocol_of(patient_server, sock)
        for _ in range(500):  # app responses, unread, until they pass the high-water mark
            send(sock, request("/openapi.json"))
            time.sleep(0.02)
            if protocol.flow.write_paused and protocol.cycle.response_complete:
                break
        assert protocol.flow.write_paused, "the app's responses never filled the buffer"
        buffered = protocol.transport.get_write_buffer_size()
        answered = patient_server._server.server_state.total_requests
        sock.setblocking(False)
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                sock.send(raw * 100)
            time.sleep(0.001)
        assert protocol.transport.get_write_buffer_size() == buffered
        assert patient_server._server.server_state.total_requests == answered


def test_a_client_that_pipelines_without_end_is_not_read_past_one_read_of_requests(
    patient_server: RunningServer,
) -> None:
    """Requests the app answers, pipelined behind one in flight, wait in a queue, each with
    its cycle. uvicorn read on after every response, so a client that pipelines without end
    queued a whole read of requests per answer (100,000 queued in 5 s here). Reading now
    waits until the queue is answered: at most one read of requests queued."""
    project, _offer = published(patient_server, make_zip({"config.json": b"{}"}))
    raw = request(CHECK_THROUGH_APP + "?channel=staging", key=project.keys["production"])
    per_read = READ_BYTES // len(raw) + 1
    most_queued, _most_buffered = flood(patient_server, raw, seconds=1, answers=2 * per_read)
    assert 0 < most_queued <= per_read


def kept_head(server: RunningServer, sock: socket.socket, key: str) -> bytes:
    """Send code-push checks with one head, each from another device, until the server keeps
    the head parsed (the first answers may be cold); the head, less its request line."""
    for n in range(20):
        target = f"{CODE_PUSH_PATH}?channel=production&current_bundle=0&device_id=warm-{n}"
        raw = request(target, key=key)
        send(sock, raw)
        assert read_answer(sock).status == 200
        head = raw[raw.find(b"\r\n") :]
        if heads_of(server.app).get(head) is not None:
            return head
    raise AssertionError("the head was never kept")


def sent_until_kept(server: RunningServer, raw: bytes) -> list[Answer]:
    """Send `raw`, each time on a new connection, until the server keeps it whole and parsed:
    it is kept the second time it is answered inline (the first answer may be cold, the app's)
    and just after its answer is written. The answers."""
    answers = []
    for _ in range(20):
        with connect(server) as sock:
            send(sock, raw)
            answers.append(read_answer(sock))
        if replays_of(server.app).get(raw) is not None:
            return answers
    raise AssertionError("the request was never kept whole")


def through_app(target: str) -> str:
    """The same request target with its path's `check` percent-encoded: the app answers it."""
    path, _, query = target.partition("?")
    return path.replace("check", "%63heck") + "?" + query


@pytest.mark.parametrize(
    "target",
    [
        f"{CODE_PUSH_PATH}?channel=production&current_bundle=0&device_id=new-device-1",
        f"{CODE_PUSH_PATH}?channel=production&current_bundle=0&device_id=new-device-2",
        f"{CODE_PUSH_PATH}?channel=staging&current_bundle=0&device_id=new-device-1",
        f"{CODE_PUSH_PATH}?channel=production&current_bundle=x&device_id=new-device-1",
        f"{CHECK_PATH}?channel=production&version=0&device_id=new-device-1",
        f"{CHECK_PATH}?channel=production&version=999&device_id=new-device-1",
        f"{CHECK_PATH}?version=abc&device_id=new-device-1",
    ],
)
def test_a_check_head_under_another_request_line_is_answered_without_parsing_it(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]], target: str
) -> None:
    """Devices of one app send the same headers and each its own `device_id`: once a head
    (what follows the request line) has come twice in checks, a check with that head under
    any plain request line with a device id is answered from it, as the app answers it."""
    project, _offer = released_project
    with connect(http_server) as sock:
        head = kept_head(http_server, sock, project.keys["production"])
        raw = f"GET {target} HTTP/1.1".encode() + head
        replayed = sent_until_kept(http_server, raw)
        send(sock, f"GET {through_app(target)} HTTP/1.1".encode() + head)
        app = read_answer(sock)
    for answer in replayed:
        assert answer.status == app.status
        assert answer.body == app.body
        assert without_date(answer) == without_date(app)
    # Never parsed: the whole request, kept once it came twice, has the kept head's headers.
    whole = replays_of(http_server.app)[raw]
    kept = heads_of(http_server.app)[head]
    assert whole is not None
    assert kept is not None
    assert whole.headers is kept.headers


@pytest.mark.parametrize(
    ("line", "status", "parsed"),
    [
        # Percent-encoded, HTTP/1.0, no device id: the parser's own check answer, then kept
        # whole.
        (f"GET {CODE_PUSH_PATH}?channel=production&device_id=a%2Db HTTP/1.1", 200, True),
        (f"GET {CHECK_PATH}?channel=production&device_id=d-1 HTTP/1.0", 200, True),
        (f"GET {CHECK_PATH}?channel=production HTTP/1.1", 200, True),
        # Not a plain GET of a check: whatever the parser and the app make of it.
        (f"GET {CHECK_PATH}?channel=a b&device_id=d-1 HTTP/1.1", 400, False),
        (f"GET {CHECK_PATH}?channel=\x7f&device_id=d-1 HTTP/1.1", 400, False),
        (f"POST {CHECK_PATH}?device_id=d-1 HTTP/1.1", 405, False),
        ("GET /healthz?device_id=d-1 HTTP/1.1", 200, False),
        (f"GET http://127.0.0.1{CHECK_PATH}?device_id=d-1 HTTP/1.1", 200, False),
    ],
    ids=["percent", "http-1.0", "no-device", "space", "control", "post", "healthz", "absolute"],
)
def test_a_kept_head_under_a_line_that_is_not_a_plain_check_goes_to_the_parser(
    http_server: RunningServer,
    released_project: tuple[Project, dict[str, Any]],
    line: str,
    status: int,
    parsed: bool,
) -> None:
    project, _offer = released_project
    with connect(http_server) as sock:
        head = kept_head(http_server, sock, project.keys["production"])
        raw = line.encode("latin-1") + head
        send(sock, raw)
        answer = read_answer(sock)
    assert answer.status == status, answer.body
    if status == 400:
        assert answer.json()["code"] == "bad_request"
    if parsed:
        assert {again.body for again in sent_until_kept(http_server, raw)} == {answer.body}
        whole = replays_of(http_server.app)[raw]
        kept = heads_of(http_server.app)[head]
        assert whole is not None
        assert kept is not None
        assert whole.headers is not kept.headers


def test_a_replayed_check_sees_a_new_activation_at_once(http_server: RunningServer) -> None:
    project, offer = published(http_server, make_zip({"a.txt": b"first"}))
    raw = request(CHECK_PATH + "?version=0", key=project.keys["production"])
    with connect(http_server) as sock:
        assert kept_for_replay(http_server, sock, raw).json()["version"] == offer["version"]
        with httpx.Client(base_url=http_server.base_url, timeout=30) as client:
            second = upload(client, project, make_zip({"a.txt": b"second"}))
            assert second.status_code == 201, second.text
            activated = client.post(
                project.path(f"/bundles/{second.json()['id']}/activate"), headers=project.auth
            )
            assert activated.status_code == 200, activated.text
        send(sock, raw)
        assert read_answer(sock).json()["version"] == second.json()["version"]


def test_a_check_answer_is_rendered_once_per_body_and_date(http_server: RunningServer) -> None:
    """The same body under the same default headers (the date) is the same answer, not
    rendered again; a new date, body or keep-alive renders anew, and a 429's is never kept."""
    endpoint = http_server.app.checks()[CHECK_PATH]
    first = [(b"date", b"Thu, 26 Nov 2026 12:00:00 GMT")]
    body = b'{"has_update":false}'
    answer = render_answer(200, endpoint, first, body, True, None)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\ndate: Thu, 26 Nov 2026 12:00:00 GMT\r\n")
    assert answer.endswith(b"content-length: 20\r\n\r\n" + body)
    assert render_answer(200, endpoint, first, body, True, None) is answer

    closing = render_answer(200, endpoint, first, body, False, None)
    assert closing == answer.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
    equal_body = bytes(bytearray(body))
    assert render_answer(200, endpoint, first, equal_body, True, None) == answer

    later = [(b"date", b"Thu, 26 Nov 2026 12:00:01 GMT")]
    renewed = render_answer(200, endpoint, later, body, True, None)
    assert renewed == answer.replace(b"12:00:00", b"12:00:01")

    limited = render_answer(429, endpoint, later, body, True, 7)
    assert b"\r\nretry-after: 7\r\ncontent-length: 20\r\n" in limited
    assert render_answer(429, endpoint, later, body, True, 3) != limited


def test_a_replayed_check_carries_the_current_date(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    project, _offer = released_project
    raw = request(CHECK_PATH + "?channel=production&version=0", key=project.keys["production"])
    with connect(http_server) as sock:
        first = kept_for_replay(http_server, sock, raw)
        deadline = time.monotonic() + 10
        while True:
            send(sock, raw)
            answer = read_answer(sock)
            if answer.headers["date"] != first.headers["date"]:
                break
            assert time.monotonic() < deadline, "the answer's date never moved"
            time.sleep(0.05)
    assert answer.body == first.body
    assert without_date(answer) == without_date(first)


def test_a_repeated_check_behind_an_unfinished_response_waits_its_turn(tmp_path: Path) -> None:
    """A repeated check that arrives while the app still works on the request before it, on
    the same connection, is answered after that request, not before."""
    running = start_server(tmp_path / "data")

    async def slow() -> dict[str, str]:
        await asyncio.sleep(0.3)
        return {"slow": "done"}

    running.app.add_api_route("/test-slow", slow)
    try:
        project = new_project(running.db)
        raw = request(CHECK_PATH, key=project.keys["production"])
        with connect(running) as sock:
            kept_for_replay(running, sock, raw)
            send(sock, request("/test-slow"))
            time.sleep(0.1)  # the app is on it, and the connection reads on
            send(sock, raw)
            first, second = read_answers(sock, 2)
    finally:
        running.stop()
    assert first.json() == {"slow": "done"}
    assert second.body == b'{"has_update":false}'


def test_a_check_with_a_body_keeps_the_connection_in_step(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    project, _offer = released_project
    key = project.keys["production"]
    with connect(http_server) as sock:
        send(sock, request(CHECK_PATH, key=key))
        warm = read_answer(sock)
        send(sock, request(CHECK_PATH, key=key, extra="Content-Length: 5\r\n") + b"hello")
        with_body = read_answer(sock)
        send(sock, request(CHECK_PATH + "?channel=staging", key=key))
        after = read_answer(sock)
    assert with_body.body == warm.body
    assert after.body == b'{"has_update":false}'


def test_a_check_that_expects_100_continue_is_answered_without_its_body(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    """As the app answers it (a check reads no body): at once, where the inline path held the
    answer for a body the client waits to be asked for."""
    project, _offer = released_project
    key = project.keys["production"]
    with connect(http_server) as sock:
        send(sock, request(CHECK_PATH, key=key))
        warm = read_answer(sock)
        send(
            sock,
            request(CHECK_PATH, key=key, extra="Expect: 100-continue\r\nContent-Length: 5\r\n"),
        )
        answer = read_answer(sock)
    assert answer.status == 200
    assert answer.body == warm.body


def test_a_check_whose_body_never_comes_is_closed_when_idle(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    """A warm check's answer waits for the body its head announced; a client that never
    sends it is as idle as one between requests, and was never closed."""
    project, _offer = released_project
    key = project.keys["production"]
    with connect(http_server) as sock:
        send(sock, request(CHECK_PATH, key=key))
        assert read_answer(sock).status == 200
        send(sock, request(CHECK_PATH, key=key, extra="Content-Length: 10\r\n"))
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, unanswered
        assert time.monotonic() - started < IDLE_SECONDS + 5


@pytest.mark.parametrize(
    ("version", "extra"),
    [
        ("1.0", ""),
        ("1.1", "Connection: close\r\n"),
        ("1.1", "Proxy-Connection: close\r\n"),
        ("1.0", "Connection: keep-alive\r\n"),
    ],
    ids=["http-1.0", "connection-close", "proxy-connection-close", "http-1.0-keep-alive"],
)
def test_a_check_that_asks_to_close_is_answered_then_closed(
    http_server: RunningServer,
    released_project: tuple[Project, dict[str, Any]],
    version: str,
    extra: str,
) -> None:
    """Answered then closed, with `connection: close`, every time: parsed, and once kept,
    replayed (the parser forgets whether to keep the connection once the message is
    complete: a kept parse read it then, and every later copy of the request kept the
    connection open). An HTTP/1.0 connection is never kept, as uvicorn decides."""
    project, _offer = released_project
    key = project.keys["production"]
    with connect(http_server) as sock:
        send(sock, request(CHECK_PATH, key=key))  # warm the cache on a kept connection
        read_answer(sock)
    raw = request(CHECK_PATH, key=key, version=version, extra=extra)
    kept_after = None
    for sent in range(20):
        with connect(http_server) as sock:
            send(sock, raw)
            answer = read_answer(sock)
            assert answer.status == 200
            assert answer.headers.get("connection") == "close"
            assert sock.recv(1) == b""  # closed by the server
        if kept_after is None and replays_of(http_server.app).get(raw) is not None:
            kept_after = sent
        if kept_after is not None and sent >= kept_after + 2:
            break
    assert kept_after is not None, "never kept for replay"


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    project, _offer = released_project
    with connect(http_server) as sock:
        send(sock, request(CHECK_PATH, key=project.keys["production"]))
        assert read_answer(sock).status == 200
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - started < IDLE_SECONDS + 5
    with connect(http_server) as sock:  # and one that never sent a byte
        assert sock.recv(1) == b""


def test_a_head_pipelined_behind_a_long_download_is_not_cut_off_by_the_header_timeout(
    tmp_path: Path,
) -> None:
    """The header timeout is for a head that never ends. One that begins behind a download,
    and cannot be read until the file is sent (sendfile holds reading), has its time from
    the download's end: the connection was cut off mid-file."""
    server = start_server(tmp_path, header_timeout_seconds=1)
    try:
        bundle = make_zip({"data.bin": os.urandom(6 * 1024 * 1024)})  # > any socket buffer
        project, offer = published(server, bundle)
        check = request(CHECK_PATH + "?channel=staging", key=project.keys["production"])
        with connect(server) as sock:
            send(sock, request(offer["download_url"].removeprefix(server.base_url)) + check[:20])
            time.sleep(0.3)
            send(sock, check[20:])
            time.sleep(1.5)  # the file waits on us, past the header timeout
            download, after = read_answers(sock, 2)
    finally:
        server.stop()
    assert download.body == bundle
    assert after.body == b'{"has_update":false}'


def test_a_connection_is_idle_from_the_end_of_its_last_response(
    http_server: RunningServer, large_release: tuple[Project, dict[str, Any], bytes]
) -> None:
    """A download that takes longer than the keep-alive timeout (here, a client that does not
    read for a while) is not idle time: the connection stays open for the whole timeout after
    the file is sent, not until the next idle check after it."""
    _project, offer, bundle = large_release
    with connect(http_server) as sock:
        send(sock, request(offer["download_url"].removeprefix(http_server.base_url)))
        time.sleep(IDLE_SECONDS * 1.5)  # the response waits on us, longer than the timeout
        # The file's last bytes leave the server while we read: its idle time starts then.
        reading = time.monotonic()
        download = read_answers(sock, 1)[0]
        assert download.body == bundle
        assert sock.recv(1) == b""  # closed once idle for the timeout
        # Counted from when the request came, the file's end would already have been too late.
        assert IDLE_SECONDS * 0.8 <= time.monotonic() - reading < IDLE_SECONDS + 5


def test_a_malformed_request_gets_a_json_400(http_server: RunningServer) -> None:
    with connect(http_server) as sock:
        send(sock, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
        answer = read_answer(sock)
    assert answer.status == 400
    assert answer.json()["code"] == "bad_request"


@pytest.mark.parametrize(
    "head",
    [
        b"".join(b"X-Header-%d: v\r\n" % number for number in range(MAX_HEADERS + 1)),
        b"X-Huge: " + b"a" * (128 * 1024) + b"\r\n",
        b"".join(b"X-Part-%d: " % number + b"a" * (30 * 1024) + b"\r\n" for number in range(3)),
    ],
    ids=["too-many", "too-large", "too-large-together"],
)
def test_a_request_head_past_its_bounds_is_431(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]], head: bytes
) -> None:
    project, _offer = released_project
    with connect(http_server) as sock:
        send(sock, request(CHECK_PATH, key=project.keys["production"], extra=head.decode()))
        answer = read_answer(sock)
    assert answer.status == 431
    assert answer.json()["code"] == "headers_too_large"


def test_downloads_are_the_stored_bytes_whole_ranged_and_headless(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    _project, offer = released_project
    stored = httpx.get(offer["download_url"], timeout=30)
    assert stored.status_code == 200
    body = stored.content
    assert len(body) == offer["file_size"]
    assert stored.headers["accept-ranges"] == "bytes"
    ranged = httpx.get(offer["download_url"], headers={"Range": "bytes=1000-2999"}, timeout=30)
    assert ranged.status_code == 206
    assert ranged.content == body[1000:3000]
    assert ranged.headers["content-range"] == f"bytes 1000-2999/{len(body)}"
    tail = httpx.get(offer["download_url"], headers={"Range": "bytes=-10"}, timeout=30)
    assert tail.content == body[-10:]
    head = httpx.head(offer["download_url"], timeout=30)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(body))


def test_a_file_larger_than_the_socket_takes_arrives_whole_and_in_order(
    http_server: RunningServer, large_release: tuple[Project, dict[str, Any], bytes]
) -> None:
    """A slow reader with a small receive window and a file larger than the socket takes:
    the first sendfile(2) sends what fits, the loop sends the rest as the client reads, and
    the check pipelined behind it follows it."""
    project, offer, bundle = large_release
    path = offer["download_url"].removeprefix(http_server.base_url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window
    sock.settimeout(10)
    sock.connect(host_port(http_server))
    try:
        send(sock, request(path) + request(CHECK_PATH, key=project.keys["production"]))
        time.sleep(0.3)  # the socket fills up while nobody reads
        download, check = read_answers(sock, 2)
    finally:
        sock.close()
    assert download.status == 200
    assert download.body == bundle
    assert check.status == 200
    assert check.json()["checksum"] == offer["checksum"]


def test_a_client_that_leaves_mid_download_does_not_disturb_others(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    project, offer = released_project
    path = offer["download_url"].removeprefix(http_server.base_url)
    for _ in range(5):
        sock = connect(http_server)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        send(sock, request(path))
        sock.recv(100)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # a reset mid-file
    check = httpx.get(
        http_server.base_url + CHECK_PATH, headers={"x-api-key": project.keys["production"]}
    )
    assert check.status_code == 200
    assert (
        httpx.get(offer["download_url"], timeout=30).content
        == httpx.get(offer["download_url"], timeout=30).content
    )


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_gone_before_its_download_starts_leaves_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that hangs up while its download is planned (a cold read of the bundle's
    checksum, slowed here as a busy database would) gets nothing: uvicorn drops the response
    start, and sending the file then raised, logged as an error of the app."""
    server = start_server(tmp_path)
    try:
        project, offer = published(server, make_zip({"config.json": b"{}"}))
        cache = server.context.check_cache
        lookup = cache.checksum_of

        async def slow_lookup(storage_path: str) -> str | None:
            await asyncio.sleep(0.5)
            return await lookup(storage_path)

        monkeypatch.setattr(cache, "checksum_of", slow_lookup)
        target = offer["download_url"].removeprefix(server.base_url)
        errors = _Collect()
        uvicorn_log = logging.getLogger("uvicorn")  # uvicorn's own: it does not propagate
        uvicorn_log.addHandler(errors)
        try:
            for extra in ("", "Range: bytes=0-9\r\n"):
                with connect(server) as sock:
                    send(sock, request(target, extra=extra))
                    time.sleep(0.1)
                time.sleep(0.8)  # the lookup ends, and the file would be sent
        finally:
            uvicorn_log.removeHandler(errors)
        with connect(server) as sock:  # and the server goes on
            send(sock, request(CHECK_PATH, key=project.keys["production"]))
            assert read_answer(sock).status == 200
    finally:
        server.stop()
    assert errors.records == [], [record.getMessage() for record in errors.records]


def test_serve_runs_this_protocol_by_default(tmp_path: Path) -> None:
    from tests.test_e2e import serving

    with serving(tmp_path / "data", "protocol") as real:
        key = real.credentials()["public_keys"]["production"]
        answer = httpx.get(real.base_url + CHECK_PATH, headers={"x-api-key": key})
        log = real.log()
    assert answer.json() == {"has_update": False}
    assert "Started server process" in log  # uvicorn's own line


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_access_log_has_every_request_without_its_query(tmp_path: Path) -> None:
    # A handler on the logger itself: `serve`'s logging set-up (run by other tests in this
    # process) stops its records from propagating to pytest's capture.
    access = logging.getLogger("koolbase_ota.access")
    collected = Collected()
    access.addHandler(collected)
    level = access.level
    access.setLevel(logging.INFO)
    running = start_server(tmp_path / "data", access_log=True, check_rate_per_address=0)
    try:
        project = new_project(running.db)
        key = project.keys["production"]
        with httpx.Client(base_url=running.base_url) as client:
            for _ in range(3):  # cold (through the app), then warm (the fast path)
                check = client.get(CHECK_PATH + "?secret=s3cr3t", headers={"x-api-key": key})
                assert check.status_code == 200
            assert client.get("/healthz").status_code == 200
    finally:
        running.stop()
        access.removeHandler(collected)
        access.setLevel(level)
    lines = collected.lines
    assert len(lines) == 4, lines
    assert all(f'"GET {CHECK_PATH} HTTP/1.1" 200' in line for line in lines[:3]), lines
    assert '"GET /healthz HTTP/1.1" 200' in lines[3]
    assert not any("s3cr3t" in line for line in lines)


def test_a_request_pipelined_behind_a_large_body_is_not_taken_for_a_large_head(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    """One read may hold the end of an upload and the start of the next request's head: only
    the head's own bytes count against its bound."""
    project, _offer = released_project
    boundary = "pipelined-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="channel"\r\n\r\ndevelopment\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="bundle"; filename="b.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        + make_zip({"big.bin": os.urandom(200 * 1024)})
        + f"\r\n--{boundary}--\r\n".encode()
    )
    upload = (
        f"POST {project.path('/upload')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {project.token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    following = request("/healthz")
    tail = 100 * 1024
    with connect(http_server) as sock:
        send(sock, upload[:-tail])
        time.sleep(0.3)
        # One read of 100 KiB: the upload's end, and the beginning of the next head.
        send(sock, upload[-tail:] + following[:20])
        time.sleep(0.3)
        send(sock, following[20:])
        uploaded, healthy = read_answers(sock, 2)
    assert uploaded.status == 201, uploaded.body
    assert healthy.status == 200


@pytest.mark.parametrize(
    "path", [CHECK_PATH, CODE_PUSH_PATH], ids=["seed-check", "code-push-check"]
)
def test_the_documented_routes_answer_as_the_endpoints_do(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]], path: str
) -> None:
    """The app answers the checks in front of FastAPI; its routes, there for OpenAPI, give the
    same answers through the same endpoint when reached."""
    project, _offer = released_project
    app = http_server.app

    async def framework_only(scope: Any, receive: Any, send: Any) -> None:
        await FastAPI.__call__(app, scope, receive, send)

    cases = [
        ("?channel=production&version=0", project.keys["production"]),
        ("?channel=production&current_bundle=1", project.keys["production"]),
        ("?version=x&current_bundle=x", project.keys["production"]),
        ("", "pk_live_000000000000000000000000"),
    ]

    async def ask() -> list[tuple[httpx.Response, httpx.Response]]:
        transport = httpx.ASGITransport(app=framework_only)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test") as route,
            httpx.AsyncClient(base_url=http_server.base_url) as endpoint,
        ):
            return [
                (
                    await route.get(path + query, headers={"x-api-key": key}),
                    await endpoint.get(path + query, headers={"x-api-key": key}),
                )
                for query, key in cases
            ]

    for through_route, through_endpoint in asyncio.run(ask()):
        assert through_route.status_code == through_endpoint.status_code
        assert through_route.content == through_endpoint.content
        assert through_route.headers["cache-control"] == "no-store"


def _upload_recording_pieces(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, *, slow_app: bool
) -> tuple[list[bytes], list[bytes]]:
    """Upload a 4 MiB bundle; return the body pieces the parser handed the protocol and the
    chunks the app received, as objects. `slow_app`: the app pauses after each chunk, so
    pieces queue up behind it."""
    from koolbase_ota.bundles import multipart, router

    pieces: list[bytes] = []
    received: list[bytes] = []
    on_body = OTAHttpProtocol.on_body

    def recording_on_body(self: OTAHttpProtocol, body: bytes) -> None:
        pieces.append(body)
        on_body(self, body)

    read_upload_form = multipart.read_upload_form

    async def recording_read(chunks: Any, **options: Any) -> Any:
        async def recorded() -> Any:
            async for chunk in chunks:
                received.append(chunk)
                if slow_app:
                    await asyncio.sleep(0.005)
                yield chunk

        return await read_upload_form(recorded(), **options)

    monkeypatch.setattr(OTAHttpProtocol, "on_body", recording_on_body)
    monkeypatch.setattr(router, "read_upload_form", recording_read)
    project = new_project(server.db)
    bundle = make_zip({"data.bin": os.urandom(4 * 1024 * 1024)})
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        answer = upload(client, project, bundle)
    assert answer.status_code == 201, answer.text
    assert answer.json()["checksum"] == "sha256:" + hashlib.sha256(bundle).hexdigest()
    assert b"".join(received) == b"".join(pieces)
    return pieces, received


def test_an_upload_piece_reaches_the_app_as_it_is(
    http_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A piece of body that finds nothing ahead of it is handed to the app as the same object:
    uvicorn appended each to a bytearray and copied that out, twice every byte of an upload."""
    pieces, received = _upload_recording_pieces(http_server, monkeypatch, slow_app=False)
    handed_as_is = [chunk for chunk in received if any(chunk is piece for piece in pieces)]
    assert handed_as_is


def test_upload_pieces_that_queue_up_reach_the_app_joined_in_order(
    http_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces that arrive while the app is busy wait, and are handed over joined, in order
    (`b"".join` of what arrived equals what was received, checked in the helper)."""
    pieces, received = _upload_recording_pieces(http_server, monkeypatch, slow_app=True)
    assert len(received) < len(pieces)
    assert max(map(len, received)) > max(map(len, pieces))


def test_a_connection_with_a_large_body_reads_a_mebibyte_at_a_time(
    http_server: RunningServer, released_project: tuple[Project, dict[str, Any]]
) -> None:
    """asyncio reads 256 KiB at a time, each read a round of the event loop: an upload's
    connection reads BODY_READ_BYTES instead, and a check's keeps the default."""
    project, _offer = released_project
    with connect(http_server) as checking:
        send(checking, request(CHECK_PATH, key=project.keys["production"]))
        assert read_answers(checking, 1)[0].status == 200
        check_protocol = protocol_of(http_server, checking)
        default = type(check_protocol.transport).max_size  # type: ignore[attr-defined]
        assert default < BODY_READ_BYTES
        assert check_protocol.transport.max_size == default  # type: ignore[attr-defined]
        assert not check_protocol.large_reads

    bundle = make_zip({"data.bin": os.urandom(2 * 1024 * 1024)})
    boundary = "large-reads"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="bundle"; filename="b.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        + bundle
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {project.path('/upload')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {project.token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with connect(http_server) as uploading:
        send(uploading, head + body)
        answer = read_answers(uploading, 1)[0]
        assert answer.status == 201, answer.body
        upload_protocol = protocol_of(http_server, uploading)
        assert upload_protocol.large_reads
        assert upload_protocol.transport.max_size == BODY_READ_BYTES  # type: ignore[attr-defined]
