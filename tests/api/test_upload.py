"""The upload endpoint over real HTTP: bundle object, form fields, versions, limits, bad zips."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bundles.test_validation import break_utf8_name
from tests.conftest import (
    BUNDLE_FIELDS,
    Project,
    RunningServer,
    assert_error,
    make_zip,
    new_project,
    upload,
    uploaded,
)

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
CHECKSUM = re.compile(r"^sha256:[0-9a-f]{64}$")
CHANNELS = ("production", "staging", "development")
#: The bundle size limit of the `limited` server; small so that tests stay fast.
LIMIT = 64 * 1024
BOUNDARY = "koolbase-test-boundary"
FIXED_TIME = (2026, 1, 1, 0, 0, 0)


# --- helpers -------------------------------------------------------------------------------


def zip_bytes(entries: list[tuple[zipfile.ZipInfo, bytes]], *, comment: bytes = b"") -> bytes:
    """A zip of exactly these entries (names kept as given, duplicates allowed)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # zipfile warns about duplicate names; some tests want exactly that.
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(buffer, "w") as archive:
            for info, data in entries:
                archive.writestr(info, data)
            archive.comment = comment
    return buffer.getvalue()


def entry(name: str, *, external_attr: int | None = None) -> zipfile.ZipInfo:
    """A ZipInfo named exactly `name`: zipfile would cut a name at NUL, so set it afterwards."""
    info = zipfile.ZipInfo("placeholder", date_time=FIXED_TIME)
    info.filename = name
    info.compress_type = zipfile.ZIP_STORED
    if external_attr is not None:
        info.external_attr = external_attr
    return info


def named_zip(name: str) -> bytes:
    return zip_bytes([(entry("config.json"), b"{}"), (entry(name), b"payload")])


def encrypted_zip() -> bytes:
    """A zip whose entry has the 'encrypted' flag (bit 0) set in both of its headers."""
    data = bytearray(zip_bytes([(entry("secret.json"), b"{}")]))
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    data[local + 6] |= 0x01
    data[central + 8] |= 0x01
    return bytes(data)


def not_utf8_zip() -> bytes:
    """A zip whose entry name is flagged UTF-8 (0x800) but is not: it was a 500."""
    data = bytearray(zip_bytes([(entry("caf\u00e9.json"), b"{}")]))
    break_utf8_name(data)
    return bytes(data)


def corrupt_zip(method: int) -> bytes:
    """A zip whose headers are intact but whose entry data is damaged."""
    content = b"abcdefgh" * 5000
    info = entry("data.json")
    info.compress_type = method
    data = bytearray(zip_bytes([(info, content)]))
    start = 30 + len("data.json")  # the first local header, then the entry's data
    for offset in range(start + 5, start + 25):
        data[offset] ^= 0x55
    return bytes(data)


def zip_of_size(size: int) -> bytes:
    """A valid zip of exactly `size` bytes, padded with the archive comment."""
    payload = os.urandom(size - 1024)
    base = zip_bytes([(entry("payload.bin"), payload)])
    padded = zip_bytes([(entry("payload.bin"), payload)], comment=b"c" * (size - len(base)))
    assert len(padded) == size
    return padded


def multipart(fields: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """The head of a multipart form (fields, then the bundle's part headers) and its tail."""
    head = b""
    for name, value in (fields or {}).items():
        head += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    head += (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="bundle"; filename="bundle.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return head, tail


def multipart_body(bundle: bytes, fields: dict[str, str] | None = None) -> bytes:
    head, tail = multipart(fields)
    return head + bundle + tail


MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def list_bundles(client: httpx.Client, project: Project) -> list[dict[str, Any]]:
    response = client.get(project.path("/bundles"), headers=project.auth)
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


def files_under(directory: Path) -> set[str]:
    if not directory.exists():
        return set()
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


@dataclass
class Snapshot:
    bundles: list[dict[str, Any]]
    stored: set[str]


def snapshot(client: httpx.Client, project: Project, server: RunningServer) -> Snapshot:
    return Snapshot(
        bundles=list_bundles(client, project),
        stored=server.stored_keys(),
    )


def assert_nothing_stored(
    client: httpx.Client, project: Project, server: RunningServer, before: Snapshot
) -> None:
    """A refused upload leaves no row, no stored file and no staged temporary file."""
    after = snapshot(client, project, server)
    assert after.bundles == before.bundles
    assert after.stored == before.stored
    assert files_under(server.settings.data_dir / "tmp") == set()


def read_http_response(sock: socket.socket) -> tuple[bytes, str, dict[str, str], bytes]:
    """Read one response with a Content-Length; returns (raw bytes, status line, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return data, status_line, headers, body[:length]


def host_port(server: RunningServer) -> tuple[str, int]:
    url = httpx.URL(server.base_url)
    assert url.port is not None
    return url.host, url.port


@pytest.fixture(scope="module")
def limited(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A server whose bundle size limit is LIMIT bytes."""
    return server_factory(max_bundle_bytes=LIMIT)


@pytest.fixture
def limited_client(limited: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.base_url, timeout=30) as http:
        yield http


@pytest.fixture
def limited_project(limited: RunningServer) -> Project:
    return new_project(limited.db)


# --- the bundle object ---------------------------------------------------------------------


def test_upload_answers_201_with_exactly_the_bundle_object(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    bundle = make_zip({"config.json": '{"banner": "hello"}', "images/logo.png": b"\x89PNG"})
    before = dt.datetime.now(dt.UTC)
    response = upload(
        client,
        project,
        bundle,
        channel="staging",
        mandatory="true",
        release_notes="Updated banner and config",
    )
    after = dt.datetime.now(dt.UTC)

    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == BUNDLE_FIELDS
    assert str(uuid.UUID(body["id"])) == body["id"]
    assert body["project_id"] == str(project.id)
    assert body["channel"] == "staging"
    assert type(body["version"]) is int
    assert body["version"] == 1
    assert type(body["file_size"]) is int
    assert body["file_size"] == len(bundle)
    assert body["checksum"] == "sha256:" + hashlib.sha256(bundle).hexdigest()
    assert CHECKSUM.match(body["checksum"])
    assert body["storage_path"] == f"ota/{project.id}/staging/v1.zip"
    assert body["mandatory"] is True
    assert body["active"] is False
    assert body["release_notes"] == "Updated banner and config"
    for name in ("created_at", "updated_at"):
        assert RFC3339_UTC.match(body[name]), body[name]
        stamp = dt.datetime.fromisoformat(body[name])
        assert stamp.utcoffset() == dt.timedelta(0)
        assert before - dt.timedelta(seconds=1) <= stamp <= after + dt.timedelta(seconds=1)
    assert body["created_at"] == body["updated_at"]

    # The exact bytes are what is stored, and the staged copy is gone.
    assert server.read_object(body["storage_path"]) == bundle
    assert files_under(server.settings.data_dir / "tmp") == set()
    assert list_bundles(client, project) == [body]


def test_upload_defaults(client: httpx.Client, project: Project) -> None:
    body = uploaded(client, project)
    assert body["channel"] == "production"
    assert body["storage_path"] == f"ota/{project.id}/production/v1.zip"
    assert body["mandatory"] is False
    assert body["release_notes"] is None
    assert body["active"] is False


# --- channel -------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", CHANNELS)
def test_each_channel_is_accepted(client: httpx.Client, project: Project, channel: str) -> None:
    body = uploaded(client, project, channel=channel)
    assert body["channel"] == channel
    assert body["storage_path"] == f"ota/{project.id}/{channel}/v1.zip"


@pytest.mark.parametrize("channel", ["Production", "STAGING", "beta", "stable", "../production"])
def test_other_channels_are_refused(
    client: httpx.Client, project: Project, server: RunningServer, channel: str
) -> None:
    before = snapshot(client, project, server)
    assert_error(upload(client, project, channel=channel), 400, "invalid_channel")
    assert_nothing_stored(client, project, server, before)


# --- mandatory -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("YeS", True),
        ("false", False),
        ("FALSE", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("NO", False),
    ],
)
def test_mandatory_is_parsed(
    client: httpx.Client, project: Project, value: str, expected: bool
) -> None:
    assert uploaded(client, project, mandatory=value)["mandatory"] is expected


@pytest.mark.parametrize("value", ["maybe", "2", "on", "y", "truee", ""])
def test_bad_mandatory_is_refused(
    client: httpx.Client, project: Project, server: RunningServer, value: str
) -> None:
    before = snapshot(client, project, server)
    response = upload(client, project, mandatory=value)
    assert_error(response, 400, "invalid_mandatory")
    # What is accepted is named: 1/0 and yes/no are, beside true/false.
    assert "yes/no" in response.json()["error"]
    assert_nothing_stored(client, project, server, before)


# --- release notes -------------------------------------------------------------------------


def test_empty_release_notes_are_null(client: httpx.Client, project: Project) -> None:
    assert uploaded(client, project, release_notes="")["release_notes"] is None


def test_release_notes_round_trip(client: httpx.Client, project: Project) -> None:
    notes = "Nouvelle bannière 🚀\nline two"
    assert uploaded(client, project, release_notes=notes)["release_notes"] == notes
    longest = "x" * 10_000
    assert uploaded(client, project, release_notes=longest)["release_notes"] == longest


def test_too_long_release_notes_are_refused(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    before = snapshot(client, project, server)
    assert_error(upload(client, project, release_notes="x" * 10_001), 400, "invalid_release_notes")
    assert_nothing_stored(client, project, server, before)


# --- the form itself -----------------------------------------------------------------------


def test_missing_bundle_is_refused(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    before = snapshot(client, project, server)
    response = client.post(
        project.path("/upload"),
        headers=project.auth,
        files={"channel": (None, "production"), "mandatory": (None, "false")},
    )
    assert_error(response, 400, "missing_bundle")
    assert_nothing_stored(client, project, server, before)


@pytest.mark.parametrize(
    ("content_type", "content"),
    [
        ("application/json", b'{"bundle": "x"}'),
        ("application/x-www-form-urlencoded", b"channel=production"),
        ("application/zip", make_zip()),
        (None, make_zip()),
    ],
)
def test_a_body_that_is_not_multipart_is_415(
    client: httpx.Client,
    project: Project,
    server: RunningServer,
    content_type: str | None,
    content: bytes,
) -> None:
    before = snapshot(client, project, server)
    headers = dict(project.auth)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = client.post(project.path("/upload"), headers=headers, content=content)
    assert_error(response, 415, "unsupported_media_type")
    assert_nothing_stored(client, project, server, before)


def test_multipart_without_a_boundary_is_400(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    before = snapshot(client, project, server)
    response = client.post(
        project.path("/upload"),
        headers={**project.auth, "Content-Type": "multipart/form-data"},
        content=multipart_body(make_zip()),
    )
    assert_error(response, 400, "invalid_multipart")
    assert_nothing_stored(client, project, server, before)


@pytest.mark.parametrize("keep", [0.3, 0.9, -3])
def test_truncated_multipart_body_is_400(
    client: httpx.Client, project: Project, server: RunningServer, keep: float
) -> None:
    """A body cut anywhere before the closing boundary is refused, not stored as is."""
    body = multipart_body(make_zip(), {"channel": "production"})
    cut = int(len(body) * keep) if keep > 0 else len(body) + int(keep)
    before = snapshot(client, project, server)
    response = client.post(
        project.path("/upload"),
        headers={**project.auth, "Content-Type": MULTIPART_TYPE},
        content=body[:cut],
    )
    assert_error(response, 400, "invalid_multipart")
    assert_nothing_stored(client, project, server, before)


def test_hand_built_multipart_body_is_accepted(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    """The body the truncation tests cut is itself valid, so their 400 is from the cut."""
    bundle = make_zip()
    response = client.post(
        project.path("/upload"),
        headers={**project.auth, "Content-Type": MULTIPART_TYPE},
        content=multipart_body(bundle, {"channel": "development"}),
    )
    assert response.status_code == 201, response.text
    assert response.json()["channel"] == "development"
    assert server.read_object(response.json()["storage_path"]) == bundle


# --- versions ------------------------------------------------------------------------------


def test_versions_start_at_1_and_grow_per_channel(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    assert uploaded(client, project)["version"] == 1
    assert uploaded(client, project, channel="production")["version"] == 2
    assert uploaded(client, project, channel="staging")["version"] == 1
    assert uploaded(client, project, channel="development")["version"] == 1
    assert uploaded(client, project, channel="staging")["version"] == 2
    assert uploaded(client, project)["version"] == 3
    # Another project has its own numbering.
    other = new_project(server.db)
    assert uploaded(client, other)["version"] == 1


def test_versions_are_never_reused_after_deleting_the_newest(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    first = uploaded(client, project)
    second = uploaded(client, project)
    assert (first["version"], second["version"]) == (1, 2)
    response = client.delete(project.path(f"/bundles/{second['id']}"), headers=project.auth)
    assert response.status_code == 204, response.text

    third = uploaded(client, project)
    assert third["version"] == 3
    assert third["storage_path"] == f"ota/{project.id}/production/v3.zip"

    # Even with the channel emptied, the numbering goes on.
    for bundle in (first, third):
        response = client.delete(project.path(f"/bundles/{bundle['id']}"), headers=project.auth)
        assert response.status_code == 204, response.text
    assert list_bundles(client, project) == []
    assert uploaded(client, project)["version"] == 4


def test_concurrent_uploads_get_distinct_consecutive_versions(
    server: RunningServer, project: Project
) -> None:
    count = 8
    barrier = threading.Barrier(count)

    def one(index: int) -> tuple[bytes, httpx.Response]:
        bundle = make_zip({"config.json": json.dumps({"upload": index})})
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            barrier.wait(timeout=10)
            return bundle, upload(http, project, bundle)

    with ThreadPoolExecutor(max_workers=count) as pool:
        results = list(pool.map(one, range(count)))

    for _, response in results:
        assert response.status_code == 201, response.text
    versions = sorted(response.json()["version"] for _, response in results)
    assert versions == list(range(1, count + 1))
    # Each answer describes its own upload, and each stored file is that upload's bytes.
    for bundle, response in results:
        body = response.json()
        assert body["checksum"] == "sha256:" + hashlib.sha256(bundle).hexdigest()
        assert body["storage_path"] == f"ota/{project.id}/production/v{body['version']}.zip"
        assert server.read_object(body["storage_path"]) == bundle
    with httpx.Client(base_url=server.base_url) as http:
        assert len(list_bundles(http, project)) == count


# --- size limit ----------------------------------------------------------------------------


def test_a_bundle_exactly_at_the_limit_is_accepted(
    limited: RunningServer, limited_client: httpx.Client, limited_project: Project
) -> None:
    bundle = zip_of_size(LIMIT)
    body = uploaded_bytes(limited_client, limited_project, bundle)
    assert body["file_size"] == LIMIT
    assert limited.read_object(body["storage_path"]) == bundle


def uploaded_bytes(client: httpx.Client, project: Project, bundle: bytes) -> dict[str, Any]:
    response = upload(client, project, bundle)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_one_byte_over_the_limit_is_413_and_nothing_is_stored(
    limited: RunningServer, limited_client: httpx.Client, limited_project: Project
) -> None:
    uploaded_bytes(limited_client, limited_project, make_zip())
    before = snapshot(limited_client, limited_project, limited)
    assert_error(
        upload(limited_client, limited_project, zip_of_size(LIMIT + 1)), 413, "bundle_too_large"
    )
    assert_nothing_stored(limited_client, limited_project, limited, before)
    # The next upload gets the next version: the refused one took nothing.
    assert uploaded_bytes(limited_client, limited_project, make_zip())["version"] == 2


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    """With `Expect: 100-continue` the server refuses at once and never asks for the body."""
    before = snapshot(client, project, server)
    head = (
        f"POST {project.path('/upload')} HTTP/1.1\r\n"
        f"Host: {host_port(server)[0]}\r\n"
        f"Authorization: Bearer {project.token}\r\n"
        f"Content-Type: {MULTIPART_TYPE}\r\n"
        f"Content-Length: {1024**4}\r\n"
        "Expect: 100-continue\r\n"
        "\r\n"
    ).encode()
    with socket.create_connection(host_port(server), timeout=5) as sock:
        sock.sendall(head)  # the headers only: not one byte of the body is ever sent
        raw, status_line, headers, body = read_http_response(sock)
    assert status_line.startswith("HTTP/1.1 413"), raw[:200]
    assert b"100 Continue" not in raw
    assert headers["content-type"].startswith("application/json")
    answer = json.loads(body)
    assert set(answer) == {"error", "code"}
    assert answer["code"] == "bundle_too_large"
    assert_nothing_stored(client, project, server, before)


def test_chunked_upload_over_the_limit_is_413_as_soon_as_it_is_passed(
    limited: RunningServer, limited_client: httpx.Client, limited_project: Project
) -> None:
    """No Content-Length: the limit is found mid-stream and answered before the body ends."""
    before = snapshot(limited_client, limited_project, limited)
    head, _ = multipart()
    request_head = (
        f"POST {limited_project.path('/upload')} HTTP/1.1\r\n"
        f"Host: {host_port(limited)[0]}\r\n"
        f"Authorization: Bearer {limited_project.token}\r\n"
        f"Content-Type: {MULTIPART_TYPE}\r\n"
        "Transfer-Encoding: chunked\r\n"
        "\r\n"
    ).encode()

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n" % len(data) + data + b"\r\n"

    with socket.create_connection(host_port(limited), timeout=5) as sock:
        sock.sendall(request_head + chunk(head))
        piece = b"\0" * 8192
        for _ in range(LIMIT // len(piece) + 2):
            sock.sendall(chunk(piece))
        # The body is not finished (no closing boundary, no last chunk), yet the answer is here.
        raw, status_line, headers, body = read_http_response(sock)
    assert status_line.startswith("HTTP/1.1 413"), raw[:200]
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["code"] == "bundle_too_large"
    assert_nothing_stored(limited_client, limited_project, limited, before)


def test_chunked_upload_over_the_limit_reaches_the_client_as_413(
    limited: RunningServer, limited_client: httpx.Client, limited_project: Project
) -> None:
    """A client that sends its whole (much too big) body still reads the 413, not a reset."""
    before = snapshot(limited_client, limited_project, limited)
    head, tail = multipart()

    def body() -> Iterator[bytes]:
        yield head
        piece = b"\0" * 65536
        for _ in range(64):  # 4 MiB, far more than the socket buffers hold
            yield piece
        yield tail

    response = limited_client.post(
        limited_project.path("/upload"),
        headers={**limited_project.auth, "Content-Type": MULTIPART_TYPE},
        content=body(),
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "bundle_too_large")
    assert_nothing_stored(limited_client, limited_project, limited, before)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize(
    ("size", "extra"),
    [
        # Far over the limit: curl sends `Expect: 100-continue` by itself for a body this big.
        (2 * 1024 * 1024, []),
        # Just over: the declared length is within the form overhead, so the stream decides.
        (LIMIT + 1, ["-H", "Expect: 100-continue"]),
    ],
    ids=["declared-length", "mid-stream"],
)
def test_curl_receives_the_413(
    limited: RunningServer,
    limited_client: httpx.Client,
    limited_project: Project,
    tmp_path: Path,
    size: int,
    extra: list[str],
) -> None:
    curl = shutil.which("curl")
    assert curl is not None
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(zip_of_size(size))
    body_file = tmp_path / "body.json"
    before = snapshot(limited_client, limited_project, limited)
    result = subprocess.run(
        [
            curl,
            "-sS",
            "-v",
            "--max-time",
            "20",
            "-o",
            str(body_file),
            "-w",
            "%{http_code} %{content_type}",
            "-H",
            f"Authorization: Bearer {limited_project.token}",
            *extra,
            "-F",
            f"bundle=@{bundle};type=application/zip",
            "-F",
            "channel=production",
            limited.base_url + limited_project.path("/upload"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    status, _, content_type = result.stdout.partition(" ")
    assert status == "413", result.stderr
    assert content_type.startswith("application/json")
    assert "> Expect: 100-continue" in result.stderr
    answer = json.loads(body_file.read_text())
    assert set(answer) == {"error", "code"}
    assert answer["code"] == "bundle_too_large"
    if not extra:
        # Refused from the declared length: the server never asked for the body.
        assert "< HTTP/1.1 100 Continue" not in result.stderr
    assert_nothing_stored(limited_client, limited_project, limited, before)


# --- bad zips ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bundle", "code"),
    [
        pytest.param(b"this is not a zip file", "invalid_zip", id="not-a-zip"),
        pytest.param(b"", "invalid_zip", id="empty-file"),
        pytest.param(make_zip()[: len(make_zip()) // 2], "invalid_zip", id="truncated"),
        pytest.param(make_zip()[:-10], "invalid_zip", id="truncated-end-record"),
        pytest.param(b"#!/bin/sh\nexit 0\n" + make_zip(), "invalid_zip", id="data-before"),
        pytest.param(corrupt_zip(zipfile.ZIP_STORED), "invalid_zip", id="bad-crc"),
        pytest.param(corrupt_zip(zipfile.ZIP_DEFLATED), "invalid_zip", id="bad-deflate-data"),
        pytest.param(corrupt_zip(zipfile.ZIP_BZIP2), None, id="bad-bzip2-data"),
        pytest.param(corrupt_zip(zipfile.ZIP_LZMA), None, id="bad-lzma-data"),
        pytest.param(named_zip("../evil"), "unsafe_entry_name", id="dotdot"),
        pytest.param(named_zip("a/../../evil"), "unsafe_entry_name", id="nested-dotdot"),
        pytest.param(named_zip("assets/.."), "unsafe_entry_name", id="trailing-dotdot"),
        pytest.param(named_zip("/etc/passwd"), "unsafe_entry_name", id="absolute"),
        pytest.param(named_zip("C:/x"), "unsafe_entry_name", id="drive-slash"),
        pytest.param(named_zip("C:\\x"), "unsafe_entry_name", id="drive-backslash"),
        pytest.param(named_zip("a\\..\\b"), "unsafe_entry_name", id="backslash-dotdot"),
        pytest.param(named_zip("..\\evil"), "unsafe_entry_name", id="backslash-escape"),
        pytest.param(named_zip("a\x00b"), "unsafe_entry_name", id="nul"),
        pytest.param(named_zip("ok.json\x00/../../evil"), "unsafe_entry_name", id="nul-hides"),
        pytest.param(named_zip("a\x01b"), "unsafe_entry_name", id="control"),
        pytest.param(named_zip("line\nbreak"), "unsafe_entry_name", id="newline"),
        pytest.param(named_zip("del\x7f"), "unsafe_entry_name", id="delete-char"),
        pytest.param(
            zip_bytes([(entry("link", external_attr=0o120777 << 16), b"/etc/passwd")]),
            "symlink_entry",
            id="symlink",
        ),
        pytest.param(
            zip_bytes([(entry("a.json"), b"{}"), (entry("a.json"), b"[]")]),
            "duplicate_entry",
            id="duplicate",
        ),
        pytest.param(encrypted_zip(), "encrypted_entry", id="encrypted"),
        pytest.param(not_utf8_zip(), "invalid_zip", id="name-not-utf8"),
    ],
)
def test_bad_zips_are_refused_and_nothing_is_stored(
    client: httpx.Client,
    project: Project,
    server: RunningServer,
    bundle: bytes,
    code: str | None,
) -> None:
    """`code` None: refusing it as invalid or as unsupported are both right."""
    before = snapshot(client, project, server)
    assert_error(upload(client, project, bundle), 422, code)
    assert_nothing_stored(client, project, server, before)
    # A refused upload takes no version.
    assert uploaded(client, project)["version"] == 1


def test_the_bad_zip_builders_make_real_zips(client: httpx.Client, project: Project) -> None:
    """The same builders with a safe name give an accepted upload: refusals are for the name."""
    body = upload(client, project, named_zip("assets/fine..name.json"))
    assert body.status_code == 201, body.text
    with zipfile.ZipFile(io.BytesIO(named_zip("x"))) as archive:
        assert archive.testzip() is None


def test_the_upload_is_parsed_hashed_and_written_off_the_event_loop(
    server: RunningServer, client: httpx.Client, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundle's bytes are handled in a worker thread: the event loop (and every check it
    serves) is never held up by an upload's hashing, writing or fsync."""
    from koolbase_ota.bundles import multipart

    threads: set[int] = set()
    original = multipart._FormReader.on_part_data

    def on_part_data(self: Any, data: bytes, start: int, end: int) -> None:
        threads.add(threading.get_ident())
        original(self, data, start, end)

    monkeypatch.setattr(multipart._FormReader, "on_part_data", on_part_data)
    loop_thread = server._thread.ident
    assert (
        upload(client, project, make_zip({"a.bin": os.urandom(3 * 1024 * 1024)})).status_code == 201
    )
    assert threads
    assert loop_thread not in threads


@pytest.mark.parametrize("durable", [True, False], ids=["local-store", "copying-store"])
def test_the_spooled_bundle_is_fsynced_only_for_a_store_that_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    """The local store hard-links the spooled file into place, so it must be on disk; S3
    copies it away and the spool is deleted, so an fsync there is only lost time."""
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    sent = make_zip()  # once: a zip made later may carry another timestamp
    staged = _read_form_in_pieces(multipart_body(sent), tmp_path, durable=durable)
    try:
        assert staged.bundle_path is not None
        assert staged.bundle_path.read_bytes() == sent
        spool = [path for path in synced if path.startswith(str(tmp_path))]
        assert spool == ([str(staged.bundle_path)] if durable else [])
    finally:
        staged.discard()


def _read_form_in_pieces(body: bytes, tmp_path: Path, *, durable: bool) -> Any:
    """read_upload_form over `body`, handed over 64 KiB at a time as a server would."""
    import asyncio

    from koolbase_ota.bundles import multipart as form

    async def chunks() -> Any:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]
            await asyncio.sleep(0)

    async def read() -> form.StagedUpload:
        return await form.read_upload_form(
            chunks(),
            content_type=MULTIPART_TYPE,
            max_bundle_bytes=8 * 1024 * 1024,
            tmp_dir=tmp_path,
            durable=durable,
        )

    return asyncio.run(read())


@pytest.mark.parametrize("durable", [True, False], ids=["local-store", "copying-store"])
def test_a_durable_bundle_is_synced_while_it_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    """The local store's spooled bundle is synced in the background every SYNC_EVERY_BYTES
    as it is written, so the fsync at its end has only the tail left; a copying store's
    spool is never synced."""
    from koolbase_ota.bundles import multipart as form

    monkeypatch.setattr(form, "SYNC_EVERY_BYTES", 256 * 1024)
    sizes: list[int] = []
    datasync = form._datasync

    def recording(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            sizes.append(os.fstat(fd).st_size)
        datasync(fd)

    monkeypatch.setattr(form, "_datasync", recording)
    bundle = make_zip({"a.bin": os.urandom(3 * 1024 * 1024)})
    staged = _read_form_in_pieces(multipart_body(bundle), tmp_path, durable=durable)
    try:
        assert staged.bundle_path is not None
        assert staged.bundle_path.read_bytes() == bundle
        assert staged.sha256 == hashlib.sha256(bundle).hexdigest()
        if durable:
            # Synced part-way (a sync still running when the next is due is not doubled, so
            # how many depends on the disk), each time further on.
            assert sizes, sizes
            assert 0 < sizes[0] < len(bundle)
            assert sizes == sorted(sizes)
        else:
            assert sizes == []
    finally:
        staged.discard()


def test_a_failed_background_sync_fails_the_upload_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk error while the bundle is synced in the background (a fault that cannot be
    caused for real here, hence the stand-in) is the upload's error, and the spooled file
    is removed."""
    from koolbase_ota.bundles import multipart as form

    monkeypatch.setattr(form, "SYNC_EVERY_BYTES", 256 * 1024)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(form, "_datasync", failing)
    body = multipart_body(make_zip({"a.bin": os.urandom(2 * 1024 * 1024)}))
    with pytest.raises(OSError, match="Input/output error"):
        _read_form_in_pieces(body, tmp_path, durable=True)
    assert list(tmp_path.iterdir()) == []


def test_the_parser_is_fed_the_pieces_as_they_came(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches go to the parsing thread as lists of the pieces received, not joined first:
    joining copied every byte of an upload once more on the event loop."""
    from python_multipart.multipart import MultipartParser

    written: list[bytes] = []
    write = MultipartParser.write

    def recording(self: MultipartParser, data: bytes) -> int:
        written.append(data)
        return write(self, data)

    monkeypatch.setattr(MultipartParser, "write", recording)
    bundle = make_zip({"a.bin": os.urandom(2 * 1024 * 1024)})
    body = multipart_body(bundle)
    staged = _read_form_in_pieces(body, tmp_path, durable=False)
    try:
        assert staged.bundle_path is not None
        assert staged.bundle_path.read_bytes() == bundle
    finally:
        staged.discard()
    assert b"".join(written) == body
    # _read_form_in_pieces hands over 64 KiB pieces; each is written as it is.
    assert max(map(len, written)) == 64 * 1024


def test_a_batch_that_failed_while_the_upload_was_refused_leaves_no_unread_error(
    tmp_path: Path,
) -> None:
    """The parsing thread failed on a malformed batch while the body's reading failed too (a
    client gone): the upload was refused, but the batch's error was never read, and asyncio
    logged "Future exception was never retrieved" with its traceback."""
    import asyncio
    import gc

    from koolbase_ota.bundles import multipart as form

    unhandled: list[dict[str, Any]] = []

    class Gone(Exception):
        pass

    async def chunks() -> Any:
        yield b"not a multipart body at all" * 50_000  # one batch: the parser refuses it
        await asyncio.sleep(0.5)  # the thread has failed by now
        raise Gone  # the client went away before the next batch

    async def read() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: unhandled.append(context)
        )
        with pytest.raises(Gone):
            await form.read_upload_form(
                chunks(),
                content_type=MULTIPART_TYPE,
                max_bundle_bytes=8 * 1024 * 1024,
                tmp_dir=tmp_path,
            )
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(read())
    assert [context["message"] for context in unhandled] == []
    assert list(tmp_path.iterdir()) == []
