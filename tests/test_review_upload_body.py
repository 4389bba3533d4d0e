"""Regression tests from a review of the uncopied request body (`OTAHttpProtocol.on_body`)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from koolbase_ota.httpserver import BODY_BUFFER_BYTES, OTAHttpProtocol
from tests.api.test_upload import MULTIPART_TYPE, host_port, multipart
from tests.conftest import RunningServer, new_project, start_server


@pytest.fixture(scope="module")
def body_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("review-body"))
    yield running
    running.stop()


def test_tiny_chunks_buffered_for_a_busy_app_stay_within_the_body_buffer(
    body_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the app is busy (here: an upload whose reader has not asked for the body yet;
    in production a parsing thread slow on a slow disk), the server reads ahead until
    BODY_BUFFER_BYTES (1 MiB) of body is buffered, then pauses reading: that bounds a
    connection's memory. The bytearray the body used to be appended to held those bytes in
    about 1 MiB. Kept as a list of the parser's pieces (`_Pieces`), a client that sends
    chunked encoding with 2-byte chunks makes every 2 bytes a bytes object of its own (48
    bytes) plus a list slot (8 bytes): 20-30 MiB a connection before reading pauses, for
    some 7 MiB on the wire, and any number of connections can do it at once."""
    from koolbase_ota.bundles import multipart as multipart_module
    from koolbase_ota.bundles import router

    protocols: list[OTAHttpProtocol] = []
    on_body = OTAHttpProtocol.on_body

    def recording_on_body(self: OTAHttpProtocol, body: bytes) -> None:
        if not protocols:
            protocols.append(self)
        on_body(self, body)

    released = threading.Event()
    read_upload_form = multipart_module.read_upload_form

    async def busy_read(chunks: Any, **options: Any) -> Any:
        while not released.is_set():
            await asyncio.sleep(0.01)
        return await read_upload_form(chunks, **options)

    monkeypatch.setattr(OTAHttpProtocol, "on_body", recording_on_body)
    monkeypatch.setattr(router, "read_upload_form", busy_read)
    project = new_project(body_server.db)
    head_of_form, _ = multipart()
    head = (
        f"POST {project.path('/upload')} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        f"Authorization: Bearer {project.token}\r\n"
        f"Content-Type: {MULTIPART_TYPE}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    first = b"%x\r\n%s\r\n" % (len(head_of_form), head_of_form)
    # 2-byte chunks (a 1-byte one would be CPython's cached single-byte object).
    content = os.urandom(20_000)
    tiny = b"".join(b"2\r\n" + content[k : k + 2] + b"\r\n" for k in range(0, len(content), 2))

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        with socket.create_connection(host_port(body_server), timeout=30) as sock:
            sock.sendall(head + first)
            sock.settimeout(1.0)
            # Send until the server has buffered past its bound and stopped reading (the
            # socket buffers between us are full).
            deadline = time.monotonic() + 30
            sent = 0
            while time.monotonic() < deadline:
                try:
                    sent = (sent + sock.send(tiny[sent:])) % len(tiny)
                except TimeoutError:
                    if protocols and len(protocols[0].cycle.body) > BODY_BUFFER_BYTES:
                        break
            time.sleep(0.3)
            held = tracemalloc.get_traced_memory()[0] - baseline
            assert protocols, "no body reached the server"
            buffered = len(protocols[0].cycle.body)
            released.set()
    finally:
        released.set()
        tracemalloc.stop()
    # The server did read ahead to its buffer's bound, and paused there.
    assert buffered > BODY_BUFFER_BYTES
    # What it holds for that should be of the order of the buffer (the bytearray's 1 MiB,
    # plus reads in flight), not tens of megabytes.
    assert held < 4 * BODY_BUFFER_BYTES, (
        f"{held / 2**20:.1f} MiB held for {buffered / 2**20:.2f} MiB of buffered body"
    )
